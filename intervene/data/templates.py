"""Prompt templates: a question row plus one answer choice -> a text, elk-style.

A template is a format string over the row's fields plus ``{answer}`` (the choice being scored)
and ``{question}`` (the row's ``question``, or its ``text`` when it has none). Built-in sets:

* ``"true_false"`` — statements judged ``" True"`` / ``" False"`` (several phrasings);
* ``"yes_no"`` — questions answered ``" Yes"`` / ``" No"``;
* ``"row"`` — the row's own prompt (``text``) followed by its own ``choices``: what the quirky
  datasets and any dataset that ships its prompts need.

Choices are indexed by label: ``choices[1]`` is the answer a label of 1 means is right.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from intervene.errors import TemplateError


@dataclass(frozen=True)
class Template:
    """One prompt format.

    Args:
        text: a ``str.format`` string; ``{answer}`` at most once (appended at the end if absent).
        choices: answer strings by label index; ``None`` takes each row's ``choices``.
        name: an id for reports (``template_ids`` of contrast pairs).
    """

    text: str
    choices: tuple[str, ...] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        fields = self.fields()
        if list(self._field_names()).count("answer") > 1:
            raise TemplateError(f"template {self.name or self.text!r} uses {{answer}} more than once")
        if "answer" not in fields:
            object.__setattr__(self, "text", self.text + "{answer}")
        if self.choices is not None and len(self.choices) < 2:
            raise TemplateError("a template needs at least two choices")

    def _field_names(self) -> list[str]:
        try:
            return [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(self.text)
                    if f is not None]
        except ValueError as e:
            raise TemplateError(f"template {self.text!r} is not a valid format string: {e}") from None

    def fields(self) -> set[str]:
        """Row fields the template reads (``answer`` included)."""
        return set(self._field_names())

    def choices_for(self, row: Mapping) -> tuple[str, ...]:
        """The answer strings for ``row`` (the template's own, or the row's ``choices``)."""
        if self.choices is not None:
            return self.choices
        choices = row.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) < 2:
            raise TemplateError(f"template {self.name or self.text!r} takes its answers from the row's "
                                f"'choices', but the row has {choices!r}")
        return tuple(str(c) for c in choices)

    def render(self, row: Mapping, answer: str) -> tuple[str, tuple[int, int]]:
        """The prompt with ``answer`` filled in, and ``(start, end)``: the answer's characters in it."""
        values = dict(row)
        if "question" not in values and "text" in values:
            values["question"] = values["text"]
        head, _, tail = self.text.partition("{answer}")
        try:
            before = head.format(**values)
            after = tail.format(**values)
        except KeyError as e:
            raise TemplateError(f"template {self.name or self.text!r} needs field {e.args[0]!r}; the row has "
                                f"{sorted(values)}") from None
        except (IndexError, ValueError) as e:
            raise TemplateError(f"template {self.name or self.text!r} cannot be rendered: {e}") from None
        return before + answer + after, (len(before), len(before) + len(answer))


_TF = (" False", " True")
_TF_LOWER = (" false", " true")
_YN = (" No", " Yes")

BUILTIN_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "true_false": (
        Template("{question}\nTrue or False?{answer}", _TF, "tf_suffix"),
        Template("Is the following statement true or false?\n{question}\nAnswer:{answer}", _TF, "tf_instruction"),
        Template("Statement: {question}\nThis statement is{answer}", _TF_LOWER, "tf_this_statement"),
        Template("Q: True or false: {question}\nA:{answer}", _TF, "tf_qa"),
    ),
    "yes_no": (
        Template("{question}\nAnswer yes or no:{answer}", (" no", " yes"), "yn_suffix"),
        Template("Question: {question}\nAnswer:{answer}", _YN, "yn_question"),
        Template("Q: {question}\nA:{answer}", _YN, "yn_qa"),
    ),
    "row": (Template("{text}{answer}", None, "row"),),
}

TemplateSpec = str | Template | Sequence[str | Template] | None


def get_templates(spec: TemplateSpec, rows: Sequence[Mapping] = ()) -> list[Template]:
    """Resolve ``spec`` to templates.

    ``spec`` may be a built-in set's name, a format string (answers from each row's ``choices``),
    a :class:`Template`, or a list of these. ``None`` picks a default from the first row: ``"row"``
    when it has ``text`` and ``choices`` (prompts that are ready), else ``"true_false"``.
    """
    if spec is None:
        first = rows[0] if rows else {}
        spec = "row" if "text" in first and "choices" in first else "true_false"
    items = [spec] if isinstance(spec, (str, Template)) else list(spec)
    out: list[Template] = []
    for i, item in enumerate(items):
        if isinstance(item, Template):
            out.append(item)
        elif isinstance(item, str) and item in BUILTIN_TEMPLATES:
            out.extend(BUILTIN_TEMPLATES[item])
        elif isinstance(item, str) and "{" in item:
            out.append(Template(item, None, f"user{i}"))
        else:
            raise TemplateError(f"unknown template {item!r}: use a built-in set ({', '.join(BUILTIN_TEMPLATES)}), "
                                "a format string with {question}/{answer}/row fields, or a Template")
    if not out:
        raise TemplateError("no templates given")
    names = [t.name or f"t{i}" for i, t in enumerate(out)]
    if len(set(names)) != len(names):
        raise TemplateError(f"template names must be unique, got {names}")
    return out
