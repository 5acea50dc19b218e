"""An ipywidgets panel to try prompts on the base model + LoRA.

It works headless too: set the widgets' values and call `generate()` / `save()` (what the
buttons do), which is how the tests and papermill runs drive it; tests/test_browser.py drives
it in a real JupyterLab in a real browser.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from ..config.stages import CLIP_MAX_TOKENS
from ..core.bounds import MAX_PROMPT_BYTES
from ..core.errors import CxrError

OWN_PROMPT = "(your own prompt)"
SAVE_MARKER = "widget_saves.json"  # marks a folder the panel writes (sample's folders hold sample_config.json)


class PromptPanel:
    """Prompt box (+ a dropdown of common impressions that follows what is typed), its CLIP token
    count, seed, steps, guidance, LoRA scale, number of images, Generate (busy and disabled while
    it runs, with a step progress bar), Save, a status line for errors, and the last images."""

    def __init__(self, pipe, common_prompts=(), resolution: int = 128, steps: int = 20, has_lora: bool | None = None,
                 scheduler: str = "dpm++", save_dir: str | Path | None = None, model: str = "", lora: str = "",
                 strict: bool = False):
        import ipywidgets as w

        self.pipe = pipe
        self.resolution = resolution
        self.scheduler = scheduler
        if has_lora is None:  # what the pipeline really holds, not what the caller believes
            has_lora = bool(getattr(pipe, "get_list_adapters", dict)().get("unet"))
        self.has_lora = has_lora
        self.save_dir = Path(save_dir) if save_dir else None
        self.model = model or getattr(pipe, "name_or_path", "") or ""
        self.lora = lora
        common = list(dict.fromkeys(p for p in common_prompts if p))
        # The dropdown starts on the prompt the box holds, so the two never disagree.
        self.common = w.Dropdown(options=[OWN_PROMPT] + common, value=common[0] if common else OWN_PROMPT,
                                 description="Common", layout=w.Layout(width="95%"))
        self.prompt = w.Textarea(value=common[0] if common else "", description="Prompt",
                                 placeholder="Type a radiology impression, e.g. Cardiomegaly.",
                                 layout=w.Layout(width="95%", height="60px"))
        self.tokens = w.HTML()
        self.strict = w.Checkbox(value=strict, description=f"Refuse prompts over {CLIP_MAX_TOKENS} tokens",
                                 indent=False)
        self.seed = w.IntText(value=0, description="Seed")
        self.steps = w.IntSlider(value=steps, min=1, max=100, description="Steps")
        self.guidance = w.FloatSlider(value=7.5, min=1.0, max=15.0, step=0.5, description="Guidance")
        self.lora_scale = w.FloatSlider(value=1.0 if has_lora else 0.0, min=0.0, max=1.5, step=0.05,
                                        description="LoRA scale", disabled=not has_lora)
        self.n_images = w.IntSlider(value=4, min=1, max=16, description="Images")
        self.button = w.Button(description="Generate", button_style="primary", icon="image")
        self.save_button = w.Button(description="Save", icon="save", disabled=True,
                                    tooltip="write the shown images and their settings to " + str(self.save_dir or "-"))
        self.progress = w.IntProgress(value=0, min=0, max=steps, description="Steps", bar_style="info",
                                      layout=w.Layout(visibility="hidden"))
        self.status = w.HTML()
        self.output = w.Output()
        self.images: list = []
        self.figure = None
        self.shown: dict | None = None  # the settings the shown images were made with (what Save writes)
        self.common.observe(self._pick, names="value")
        self.prompt.observe(self._prompt_changed, names="value")
        self.button.on_click(lambda _: self.generate())
        self.save_button.on_click(lambda _: self.save())
        self._count()
        if not has_lora:
            self._say("No LoRA loaded: the images come from the base model, so the LoRA scale is off.", "info")
        self.widget = w.VBox([self.common, self.prompt, w.HBox([self.tokens, self.strict]),
                              w.HBox([self.seed, self.steps]), w.HBox([self.guidance, self.lora_scale]),
                              w.HBox([self.n_images, self.button, self.save_button]), self.progress, self.status,
                              self.output])
        self.widget.add_class("cxr-prompt-panel")  # a stable hook for the browser test

    # ------------------------------------------------------------ prompt box and dropdown ----

    def _pick(self, change=None) -> None:
        if self.common.value != OWN_PROMPT:
            self.prompt.value = self.common.value

    def _prompt_changed(self, change=None) -> None:
        # Typing away from a common impression moves the dropdown to "(your own prompt)".
        self.common.value = self.prompt.value if self.prompt.value in self.common.options else OWN_PROMPT
        self._count()

    def token_count(self) -> int:
        return len(self.pipe.tokenizer(self.prompt.value, truncation=False).input_ids)

    def oversized(self) -> str:
        """The sentence for a prompt past bounds.MAX_PROMPT_BYTES (a file pasted in), else ""."""
        size = len(self.prompt.value.encode("utf-8", "surrogatepass"))
        return (f"The prompt is {size:,} bytes, over the {MAX_PROMPT_BYTES:,}-byte bound (CLIP reads 77 tokens); "
                "shorten it.") if size > MAX_PROMPT_BYTES else ""

    def _count(self, change=None) -> None:
        too_long = self.oversized()
        if too_long:  # not tokenized: that alone would take minutes
            self.tokens.value = f"<span style='color:#c44e52'>{too_long}</span>"
            return
        n = self.token_count()
        over = n > CLIP_MAX_TOKENS
        colour = "#c44e52" if over else "#555"
        note = f" (over {CLIP_MAX_TOKENS}: the end is cut off)" if over else ""
        self.tokens.value = f"<span style='color:{colour}'>{n} / {CLIP_MAX_TOKENS} CLIP tokens{note}</span>"

    def _say(self, text: str, kind: str = "error") -> None:
        colour = {"error": "#c44e52", "info": "#555", "ok": "#55a868"}[kind]
        self.status.value = (f"<span class='cxr-status-{kind}' style='color:{colour}'>{html.escape(text)}</span>"
                             if text else "")

    def _busy(self, busy: bool) -> None:
        self.button.disabled = busy
        self.button.description = "Generating…" if busy else "Generate"
        self.button.icon = "hourglass-half" if busy else "image"
        self.save_button.disabled = busy or not self.images
        self.progress.layout.visibility = "visible" if busy else "hidden"

    def _step(self, step: int) -> None:
        self.progress.value = step

    # ------------------------------------------------------------ the buttons ----------------

    def generate(self):
        """What the Generate button does: images for the current settings, shown in the output
        area and kept in `self.images` / `self.figure`. A mistake (no prompt, a prompt over the
        limit with the box ticked) is said in the status line; the last images stay."""
        from IPython.display import clear_output, display

        from ..figures import plots
        from ..models.generation import generate

        prompt = self.prompt.value.strip()
        if not prompt:
            self._say("Type a prompt (or pick a common one) first.")
            return self.images
        too_long = self.oversized()
        if too_long:
            self._say(too_long)
            return self.images
        n_tokens = self.token_count()
        if self.strict.value and n_tokens > CLIP_MAX_TOKENS:
            self._say(f"The prompt has {n_tokens} CLIP tokens, over the {CLIP_MAX_TOKENS} limit; shorten it, "
                      "or untick the box to let CLIP cut the end off.")
            return self.images
        seeds = [self.seed.value + i for i in range(self.n_images.value)]
        settings = {"prompt": prompt, "seeds": seeds, "steps": self.steps.value, "guidance": self.guidance.value,
                    "lora_scale": self.lora_scale.value if self.has_lora else 0.0, "scheduler": self.scheduler,
                    "resolution": self.resolution, "n_tokens": n_tokens}
        self._say("")
        self.progress.max, self.progress.value = settings["steps"], 0
        self._busy(True)
        try:
            images = generate(self.pipe, [prompt] * len(seeds), seeds, self.resolution, settings["steps"],
                              lora_scale=settings["lora_scale"] if self.has_lora else None,
                              guidance=settings["guidance"], scheduler=self.scheduler, on_step=self._step)
        except CxrError as exc:
            self._say(str(exc))
            return self.images
        except Exception as exc:  # shown in the panel: a traceback in a callback is lost in the browser
            self._say(f"Generation failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")
            return self.images
        finally:
            self._busy(False)
        self.images, self.shown = images, settings
        self.figure = plots.image_grid(images, [f"seed {s}" for s in seeds], columns=min(4, len(seeds)), title=prompt)
        # The old images go only when the new ones are ready.
        with self.output:
            clear_output(wait=True)
            display(self.figure)
        self.save_button.disabled = False
        return self.images

    def save(self) -> Path | None:
        """What the Save button does: the shown images as PNGs in `save_dir`, with a metadata.csv
        row each in `sample`'s columns (a later Save adds rows)."""
        from ..core.files import atomic_path, read_csv, write_csv, write_json
        from ..core.layout import METADATA_COLUMNS, METADATA_CSV, SAMPLE_CONFIG_JSON
        from .stage import metadata_row

        if not self.images or self.shown is None:
            self._say("Nothing to save yet: press Generate first.")
            return None
        if self.save_dir is None:
            self._say("No folder to save into: make the panel with save_dir=FOLDER.")
            return None
        out = self.save_dir
        if (out / SAMPLE_CONFIG_JSON).is_file():
            self._say(f"{out} holds a sample run's images; pick another save_dir so the two sets do not mix.")
            return None
        metadata_csv = out / METADATA_CSV
        before = read_csv(metadata_csv) if metadata_csv.is_file() else pd.DataFrame(columns=METADATA_COLUMNS)
        index = int(before["prompt_index"].max()) + 1 if len(before) else 0
        s = self.shown
        rows = [metadata_row(s["prompt"], index, k, seed, s["n_tokens"], steps=s["steps"], scheduler=s["scheduler"],
                             guidance=s["guidance"], negative_prompt="", lora_scale=s["lora_scale"], model=self.model,
                             lora=self.lora if self.has_lora else "", resolution=s["resolution"])
                for k, seed in enumerate(s["seeds"])]
        for row, image in zip(rows, self.images, strict=True):
            with atomic_path(out / row["file"]) as tmp:
                image.save(tmp, format="PNG")
        new = pd.DataFrame(rows, columns=METADATA_COLUMNS)
        write_csv(metadata_csv, pd.concat([before, new], ignore_index=True) if len(before) else new)
        write_json(out / SAVE_MARKER, {"stage": "widget", "note": "images saved from the prompt panel"})
        self._say(f"Saved {len(rows)} image(s) and their settings to {out}.", "ok")
        return out

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
