"""Make diffusers' generic loaders aware of this package.

diffusers resolves a pipeline folder with two tables: `model_index.json` names each component as
`[library, class]`, and `LOADABLE_CLASSES` says which libraries components may come from and which classes in them
have `save_pretrained` / `from_pretrained`. A library outside that table is recorded under its full module path
(`diffusers_uncertainty.models.uncertainty_controlnet`) and refused for Hub downloads. Registering the package
records components as `["diffusers_uncertainty", "UncertaintyControlNetModel"]` and lets any diffusers loader
read them. `DiffusionPipeline.from_pretrained` finds a folder's pipeline class by `_class_name` in the `diffusers`
namespace, so the pipeline class is exposed there too.
"""

import diffusers
from diffusers.pipelines import pipeline_loading_utils, pipeline_utils


LIBRARY_NAME = "diffusers_uncertainty"


def register_with_diffusers(models: list[type], pipelines: list[type]) -> None:
    r"""
    Register this package's loadable classes and pipelines with diffusers. Idempotent.

    Args:
        models (`list[type]`):
            `ModelMixin` subclasses defined in this package (saved/loaded with `save_pretrained`/`from_pretrained`).
        pipelines (`list[type]`):
            `DiffusionPipeline` subclasses, made reachable through `DiffusionPipeline.from_pretrained`.
    """
    methods = {model.__name__: ["save_pretrained", "from_pretrained"] for model in models}
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(LIBRARY_NAME, {}).update(methods)
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(methods)
    if LIBRARY_NAME not in pipeline_utils.LIBRARIES:
        pipeline_utils.LIBRARIES.append(LIBRARY_NAME)
    for pipeline in pipelines:
        setattr(diffusers, pipeline.__name__, pipeline)
