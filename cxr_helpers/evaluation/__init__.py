"""The evaluation stage: feature networks, image sets, metrics, the memorisation audit, prompt adherence and its scorers."""
