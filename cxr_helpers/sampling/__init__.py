"""The sampling stage: sample folders, galleries, the synthesize export, the prompt panel."""
