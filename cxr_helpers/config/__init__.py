"""Settings: how a setting is declared, the stage dataclasses built from them, presets, and the CLI flags generated from them."""
