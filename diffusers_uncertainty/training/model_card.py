"""Model cards for trained controls, filled from the templates in the repository's `model_cards/` folder."""

import os
import string

from ..atomic import write_text_atomic


def write_model_card(template_path: str | os.PathLike, save_path: str | os.PathLike, **values) -> str:
    r"""
    Fill a model-card template and write it atomically (temporary file, then rename).

    The template uses `string.Template` placeholders (`$name` or `${name}`); every placeholder must get a value,
    so a card is never written half-filled.

    Args:
        template_path (`str` or `os.PathLike`):
            The template, e.g. `model_cards/controlnet_card.md`.
        save_path (`str` or `os.PathLike`):
            Where the card goes, usually `<output_dir>/README.md`.
        values:
            The placeholder values; converted with `str()`.

    Returns:
        `str`: the card's text.

    Raises:
        `ValueError`: if a placeholder of the template has no value.
    """
    with open(template_path, encoding="utf-8") as handle:
        template = string.Template(handle.read())
    try:
        text = template.substitute({key: str(value) for key, value in values.items()})
    except KeyError as error:
        raise ValueError(
            f"The model card template {template_path} needs a value for {error.args[0]!r}, but none was given."
        ) from None
    write_text_atomic(save_path, text)
    return text
