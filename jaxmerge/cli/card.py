"""The model card (README.md) written with a merged model: the method, the models and the config."""

from __future__ import annotations

import yaml

from jaxmerge.cli.config import MergeConfig


def model_card(config: MergeConfig, name: str, names: dict | None = None) -> str:
    """A Hugging Face model card for the merge ``config``, titled ``name``.

    Its YAML header tags the model as a merge and lists the models merged as its base
    models; its text names the method (with its paper), the base model and every model,
    and quotes the config. ``names`` gives models named otherwise than by their directory
    (``{directory: name}``: a model with its adapter applied, by its reference).
    """
    def shown(model) -> str:
        return (names or {}).get(model, str(model))
    models = list(dict.fromkeys(shown(s.model) for slice_ in config.slices for s in slice_.sources))
    method = config.method
    header = yaml.safe_dump({"base_model": models, "library_name": "transformers", "tags": ["merge", "jaxmerge"]},
                            sort_keys=False).strip()
    papers = ", ".join(f"[arXiv {ref}](https://arxiv.org/abs/{ref})" for ref in method.references)
    base = f", with `{shown(config.base)}` as the base model" if config.base is not None else ""
    listing = "\n".join(f"- `{m}`" for m in models)
    return (f"---\n{header}\n---\n# {name}\n\nThis model is a merge of the models below, made with jaxmerge's "
            f"`{method.name}` method ({method.summary.rstrip('.')}{'; ' + papers if papers else ''}){base}.\n\n"
            f"## Models merged\n\n{listing}\n\n## Configuration\n\n```yaml\n{config.text.strip()}\n```\n")
