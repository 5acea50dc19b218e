"""An ipywidgets panel to try prompts on the base model + LoRA.

It works headless too: set the widgets' values and call `generate()` (what the button does),
which is how the tests and papermill runs drive it.
"""

from __future__ import annotations

from .config import CLIP_MAX_TOKENS


class PromptPanel:
    """Prompt box (+ a dropdown of common impressions), its CLIP token count, seed, steps,
    guidance, LoRA scale, number of images, a Generate button and an output area."""

    def __init__(self, pipe, common_prompts=(), resolution: int = 128, steps: int = 20, has_lora: bool = True,
                 scheduler: str = "dpm++"):
        import ipywidgets as w

        self.pipe = pipe
        self.resolution = resolution
        self.scheduler = scheduler
        self.has_lora = has_lora
        common = list(dict.fromkeys(common_prompts))
        self.common = w.Dropdown(options=["(type below)"] + common, description="Common", layout=w.Layout(width="95%"))
        self.prompt = w.Textarea(value=common[0] if common else "", description="Prompt",
                                 layout=w.Layout(width="95%", height="60px"))
        self.tokens = w.HTML()
        self.seed = w.IntText(value=0, description="Seed")
        self.steps = w.IntSlider(value=steps, min=1, max=100, description="Steps")
        self.guidance = w.FloatSlider(value=7.5, min=1.0, max=15.0, step=0.5, description="Guidance")
        self.lora_scale = w.FloatSlider(value=1.0 if has_lora else 0.0, min=0.0, max=1.5, step=0.05,
                                        description="LoRA scale", disabled=not has_lora)
        self.n_images = w.IntSlider(value=4, min=1, max=16, description="Images")
        self.button = w.Button(description="Generate", button_style="primary", icon="image")
        self.output = w.Output()
        self.images: list = []
        self.figure = None
        self.common.observe(self._pick, names="value")
        self.prompt.observe(self._count, names="value")
        self.button.on_click(lambda _: self.generate())
        self._count()
        self.widget = w.VBox([self.common, self.prompt, self.tokens,
                              w.HBox([self.seed, self.steps]), w.HBox([self.guidance, self.lora_scale]),
                              w.HBox([self.n_images, self.button]), self.output])

    def _pick(self, change=None) -> None:
        if self.common.value in self.common.options[1:]:
            self.prompt.value = self.common.value

    def token_count(self) -> int:
        return len(self.pipe.tokenizer(self.prompt.value, truncation=False).input_ids)

    def _count(self, change=None) -> None:
        n = self.token_count()
        over = n > CLIP_MAX_TOKENS
        colour = "#c44e52" if over else "#555"
        note = f" (over {CLIP_MAX_TOKENS}: the end is cut off)" if over else ""
        self.tokens.value = f"<span style='color:{colour}'>{n} / {CLIP_MAX_TOKENS} CLIP tokens{note}</span>"

    def generate(self):
        """What the Generate button does: images for the current settings, shown in the output
        area and kept in `self.images` / `self.figure`."""
        from IPython.display import clear_output, display

        from . import plots
        from .sample import generate

        prompt = self.prompt.value.strip()
        with self.output:
            clear_output(wait=True)
            if not prompt:
                print("Type a prompt (or pick a common one) first.")
                self.images, self.figure = [], None
                return self.images
            seeds = [self.seed.value + i for i in range(self.n_images.value)]
            self.images = generate(self.pipe, [prompt] * len(seeds), seeds, self.resolution, self.steps.value,
                                   lora_scale=self.lora_scale.value if self.has_lora else None,
                                   guidance=self.guidance.value, scheduler=self.scheduler)
            self.figure = plots.image_grid(self.images, [f"seed {s}" for s in seeds], columns=min(4, len(seeds)),
                                           title=prompt)
            display(self.figure)
        return self.images

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
