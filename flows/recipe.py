"""A recipe: which tensors get which scheme, and the quality gates a result must pass.

Targets and ignores name modules as compressed-tensors does: exact module names
("model.layers.0.mlp.down_proj"), class-like shorthands ("Linear" = every 2-D weight,
"Embedding"), or regexes prefixed `re:` matched against the module name. A module is the tensor
name without its `.weight` suffix. `overrides` give other schemes to some modules (first match
wins), so a plan can hold any scheme per tensor.

    scheme: W4A16
    method: search          # rtn (default) | search | hqq: how scales are chosen (quantizers.methods)
    ignore: ["re:.*layers\\.0\\..*"]
    overrides:
      - targets: ["re:.*down_proj$"]
        scheme: W8A16
        method: hqq
    gates: {min_sqnr_db: 12, max_output_error: 0.2, max_mean_kl: 0.05, min_top1: 0.9}
    evaluate: true          # or {text: notes.txt, max_tokens: 8192, context: 512}
    target_bits: 4.5        # mixed precision under a budget (or target_size: 120GB); see flows.mixed
    candidates: [{scheme: W4A16, group_size: 64}, {scheme: W8A16}]   # default: flows.mixed.budget

`format: gguf` writes llama.cpp's GGUF instead of compressed-tensors (`flows.gguf_output.plan`); the
scheme is then a GGUF type or mix (F16, BF16, Q8_0, Q6_K, Q5_K, Q4_K, Q4_K_M, Q5_K_M), applied to
every 2-D weight by llama.cpp's rules: targets, ignore, overrides and methods do not apply.
`gguf: Q4_K_M` on a compressed-tensors recipe asks for both formats: the GGUF of the same source is
written beside the compressed-tensors checkpoint, in `gguf/` of the same version, and published with
it in one commit (`flows.gguf_output.companion`).

Tensor gates (`min_sqnr_db`, `min_cosine`, `max_output_error`) are checked on the workers, for
every quantized tensor. Model gates (`max_mean_kl`, `min_top1`, `min_embedding_cosine`) need the
model-level evaluation, which runs on the staged copy before it is published; setting one turns
the evaluation on. A result below a gate is never published.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.llm_compressor_recipe import is_llm_compressor_recipe, recipe_data
from quantizers import QuantScheme, check_method, get_scheme
from quantizers.errors import UnknownSchemeError

__all__ = ["Recipe", "SchemeChoice", "Override", "Gates", "Evaluate", "DEFAULT_IGNORE", "RecipeError"]

# Conventionally left unquantized: embeddings, the output head, norms, MoE routers.
DEFAULT_IGNORE = (
    "Embedding",
    "lm_head",
    "re:(?i).*norm[^.]*$",
    "re:.*(^|\\.)(gate|router)$",
    "re:.*shared_expert_gate$",
)

# Below these per-tensor SQNRs a result is broken, not merely lossy (Gaussian-weight SQNR is
# ~40 dB for int8, ~31 dB for FP8, ~20 dB for 4-bit formats; real weights with outliers less).
DEFAULT_MIN_SQNR_DB = {8: 20.0, 4: 8.0}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says which field and why."""


class SchemeChoice(BaseModel):
    """A preset name and the options applied to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: str = "W4A16"
    group_size: int | None = None
    symmetric: bool | None = None
    per_channel: bool = False
    method: str = "rtn"  # rtn | search | hqq; the stored format is the same (quantizers.methods)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        return check_method(method)

    def resolve(self) -> QuantScheme:
        return get_scheme(
            self.scheme,
            group_size=self.group_size,
            symmetric=self.symmetric,
            per_channel=self.per_channel,
        )


class Override(SchemeChoice):
    targets: tuple[str, ...] = Field(min_length=1)
    # Modules among the targets this override leaves to the rest of the recipe (an llm-compressor
    # recipe's ignore list applies to every scheme in it). Left out when empty: plan ids stay.
    ignore: tuple[str, ...] = Field(default=(), exclude_if=lambda v: not v)


class Gates(BaseModel):
    """Quality gates. Per tensor (on the workers): a tensor below them fails the run. Per model
    (after the evaluation of the staged result): a result below them is not published."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # No NaN or infinity: a comparison with NaN is always false, so every tensor would fail.
    min_sqnr_db: float | None = Field(default=None, allow_inf_nan=False)  # None: by the bit width
    min_cosine: float = Field(default=0.9, ge=-1, le=1)
    max_output_error: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # ||Wx - W'x|| / ||Wx||
    max_mean_kl: float | None = Field(default=None, ge=0)  # causal LMs: mean KL(original || quantized)
    min_top1: float | None = Field(default=None, ge=0, le=1)  # causal LMs: top-1 token agreement
    min_embedding_cosine: float | None = Field(default=None, ge=-1, le=1)  # encoders: pooled cosine

    MODEL_GATES: ClassVar[tuple[str, ...]] = ("max_mean_kl", "min_top1", "min_embedding_cosine")

    @property
    def needs_evaluation(self) -> bool:
        return any(getattr(self, name) is not None for name in self.MODEL_GATES)

    def min_sqnr_for(self, scheme: QuantScheme) -> float:
        if self.min_sqnr_db is not None:
            return self.min_sqnr_db
        return DEFAULT_MIN_SQNR_DB.get(scheme.num_bits, 8.0)


class Evaluate(BaseModel):
    """The model-level evaluation of the staged result against the original, before publishing.

    `evaluate: true` in YAML is short for `evaluate: {enabled: true}`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    text: str | None = None  # a file or URI; None: the built-in text shipped with quantfleet
    max_tokens: int = Field(default=8192, ge=16)
    context: int = Field(default=512, ge=8)

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data: object) -> object:
        return {"enabled": data} if isinstance(data, bool) else data


class Recipe(SchemeChoice):
    """What to quantize and how; identical recipes give identical plans."""

    name: str | None = None
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    use_default_ignore: bool = True
    overrides: tuple[Override, ...] = ()
    gates: Gates = Gates()
    evaluate: Evaluate = Evaluate()
    # Random probe vectors per quantized Linear for the data-free output error (0: not measured).
    probes: int = Field(default=16, ge=0, le=256)
    # Output format; left out of the JSON when it is the default, so existing plan ids stay.
    format: Literal["compressed-tensors", "gguf"] = Field(
        default="compressed-tensors", exclude_if=lambda v: v == "compressed-tensors")
    # Both formats: also the GGUF of this type or mix, published in the same version (left out of
    # the JSON when unset, so other recipes keep their plan ids).
    gguf: str | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("gguf")
    @classmethod
    def _gguf_type(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from quantizers.gguf.mixes import GGUF_SCHEMES

        if value.upper() not in GGUF_SCHEMES:
            raise ValueError(f"gguf: {value!r} is not a GGUF type; GGUF types: {', '.join(GGUF_SCHEMES)}")
        return value.upper()

    def gguf_recipe(self) -> Recipe | None:
        """The GGUF half of a both-formats recipe (None without `gguf:`): its type, name and the
        per-tensor gates; the model-level evaluation is the compressed-tensors half's."""
        if self.gguf is None:
            return None
        gates = Gates(min_sqnr_db=self.gates.min_sqnr_db, min_cosine=self.gates.min_cosine)
        return Recipe(scheme=self.gguf, format="gguf", name=self.name, gates=gates)

    @model_validator(mode="after")
    def _gguf_scheme(self) -> Recipe:
        if self.format != "gguf":
            return self
        if self.gguf is not None:
            raise ValueError("gguf: asks for a GGUF beside compressed-tensors output; with format: gguf "
                             "the scheme already is the GGUF type")
        from quantizers.gguf.mixes import GGUF_SCHEMES

        if self.scheme.upper() not in GGUF_SCHEMES:
            raise ValueError(
                f"scheme {self.scheme!r} is not a GGUF type; GGUF schemes: {', '.join(GGUF_SCHEMES)}")
        if (self.overrides or self.ignore or self.method != "rtn" or self.group_size is not None
                or self.per_channel or self.mixed or self.candidates):
            raise ValueError("GGUF output takes a type or mix for the whole model (llama.cpp's rules); "
                             "overrides, ignore, method, group_size, per_channel, budgets and "
                             "candidates do not apply")
        return self

    def check_schemes(self) -> None:
        """Fail now, not on a worker, on a scheme that does not exist."""
        if self.format == "gguf":
            return  # checked when the recipe was built
        self.resolve()
        for override in (*self.overrides, *self.candidates):
            override.resolve()

    # Mixed precision (flows.mixed): a budget picks one candidate scheme per tensor. Left out of
    # dumps when unset, so other recipes keep their plan ids and manifests.
    target_bits: float | None = Field(default=None, gt=0, le=32, exclude_if=lambda v: v is None)
    target_size: int | None = Field(default=None, gt=0, exclude_if=lambda v: v is None)
    candidates: tuple[SchemeChoice, ...] = Field(default=(), exclude_if=lambda v: not v)

    @field_validator("target_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        from infra.sizes import parse_size

        return None if value is None else parse_size(value)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _one_budget(self) -> Recipe:
        if self.target_bits is not None and self.target_size is not None:
            raise ValueError("target_bits and target_size: give one budget, not both")
        return self

    @property
    def mixed(self) -> bool:
        """Whether a budget asks for mixed precision (one candidate scheme chosen per tensor)."""
        return self.target_bits is not None or self.target_size is not None

    def candidate_choices(self) -> tuple[SchemeChoice, ...]:
        """The candidates of the mixed-precision solve; by default flows.mixed.budget's, with the
        recipe's method when it is not rtn."""
        if self.candidates:
            return self.candidates
        from flows.mixed.budget import default_candidates

        return tuple(SchemeChoice.model_validate(c) for c in default_candidates(self.method))

    @property
    def evaluates(self) -> bool:
        """Whether the staged result is evaluated against the original before it is published."""
        return self.evaluate.enabled or self.gates.needs_evaluation

    def plan_key(self, *, tensor_gates: bool = True) -> dict[str, object]:
        """What of the recipe decides the converted bytes: everything but the model-level
        evaluation and its gates, so relaxing a model gate resumes from the staged shards.
        `tensor_gates=False` leaves out the per-tensor gates too (the staging id: the workers
        check a reused unit's recorded figures against the gates they run with)."""
        data = self.model_dump(mode="json", exclude={"evaluate"})
        data["gates"] = {k: v for k, v in data["gates"].items()
                         if k not in Gates.MODEL_GATES and tensor_gates}
        # The default method adds nothing to the key, so RTN plans keep the ids they always had.
        for entry in (data, *data["overrides"]):
            if entry.get("method") == "rtn":
                del entry["method"]
        return data

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise ValueError(f"bad regex {pattern!r}: {error}") from error
        return patterns

    @property
    def label(self) -> str:
        """A short name for paths and reports: the recipe's name or its scheme."""
        return self.name or self.scheme.upper()

    @cached_property
    def _base_scheme(self) -> QuantScheme:
        return self.resolve()

    @cached_property
    def _matchers(self) -> tuple[_Matcher, _Matcher, list[tuple[_Matcher, _Matcher, QuantScheme, str]]]:
        ignore = self.ignore + (DEFAULT_IGNORE if self.use_default_ignore else ())
        overrides = [(_Matcher(o.targets), _Matcher(o.ignore), o.resolve(), o.method) for o in self.overrides]
        return _Matcher(self.targets), _Matcher(ignore), overrides

    def scheme_for(self, tensor_name: str, shape: tuple[int, ...]) -> QuantScheme | None:
        """The scheme for a tensor, or None to keep it as it is (not a targeted 2-D weight)."""
        choice = self.choice_for(tensor_name, shape)
        return None if choice is None else choice[0]

    def choice_for(self, tensor_name: str, shape: tuple[int, ...]) -> tuple[QuantScheme, str] | None:
        """(scheme, method) for a tensor, or None to keep it as it is."""
        if not tensor_name.endswith(".weight") or len(shape) != 2 or 0 in shape:
            return None
        module = tensor_name.removesuffix(".weight")
        targets, ignore, overrides = self._matchers
        for matcher, left, scheme, method in overrides:
            if matcher.matches(module) and not left.matches(module):
                return scheme, method
        if ignore.matches(module) or not targets.matches(module):
            return None
        return self._base_scheme, self.method

    def unmatched(self, weights: Iterable[str]) -> list[str]:
        """`targets` and each override's targets that match none of `weights` (2-D weight names):
        most often a misspelt module name, which would otherwise quantize as if it were absent."""
        if self.format == "gguf":
            return []  # llama.cpp's rules choose the types; targets do not apply
        modules = [w.removesuffix(".weight") for w in weights if w.endswith(".weight")]
        targets, _, overrides = self._matchers
        found = [] if any(targets.matches(m) for m in modules) else [f"targets {list(self.targets)}"]
        for number, (matcher, _, _, _) in enumerate(overrides):
            if not any(matcher.matches(m) for m in modules):
                found.append(f"overrides[{number}] targets {list(self.overrides[number].targets)}")
        return found

    def ignore_list(self) -> list[str]:
        """The `ignore` entries written to config.json."""
        return sorted(set(self.ignore + (DEFAULT_IGNORE if self.use_default_ignore else ())))

    @classmethod
    def preset(cls, scheme: str, **options: object) -> Recipe:
        try:
            recipe = cls.model_validate({"scheme": scheme, **options})
        except ValidationError as error:
            raise RecipeError(str(error.errors()[0]["msg"]).removeprefix("Value error, ")) from error
        recipe.check_schemes()  # fail now on an unknown scheme, not on a worker
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        location = Path(path)
        try:
            data = yaml.safe_load(location.read_text()) or {}
        except (OSError, UnicodeDecodeError) as error:
            raise RecipeError(f"{location}: cannot read recipe: {error}") from error
        except yaml.YAMLError as error:
            raise RecipeError(f"{location}: not valid YAML: {_yaml_problem(error)}") from error
        try:
            if is_llm_compressor_recipe(data):
                data = recipe_data(data, DEFAULT_IGNORE)
            recipe = cls.model_validate(data)
            recipe.check_schemes()
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "recipe"
            raise RecipeError(f"{location}: {where}: {first['msg']}") from error
        except (ValueError, UnknownSchemeError) as error:
            raise RecipeError(f"{location}: {error}") from error
        return recipe


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its own text spans several lines)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


class _Matcher:
    """Matches module names against exact names, class shorthands and `re:` patterns."""

    # Class-like shorthands, recognised from the module name since no model object exists.
    _CLASSES = {
        "Linear": None,  # every 2-D weight (shape is checked by the caller)
        "Embedding": re.compile(r".*(embed_tokens|embeddings?|wte|wpe|word_embeddings)[^.]*$"),
    }

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.exact = frozenset(p for p in patterns if not p.startswith("re:") and p not in self._CLASSES)
        # An exact name also matches as a suffix, as in compressed-tensors ("lm_head").
        self.suffixes = tuple("." + e for e in sorted(self.exact))
        sources = [p[3:] for p in patterns if p.startswith("re:")]
        sources += [r.pattern for p in patterns if (r := self._CLASSES.get(p)) is not None]
        # One alternation, so a million names cost one regex call each; each branch keeps its
        # own inline flags by being wrapped in a group that carries them.
        self.regex = re.compile("|".join(f"(?:{_scoped(s)})" for s in sources)) if sources else None
        self.everything = "Linear" in patterns

    def matches(self, module: str) -> bool:
        if self.everything or module in self.exact:
            return True
        if self.suffixes and module.endswith(self.suffixes):
            return True
        return self.regex is not None and self.regex.fullmatch(module) is not None


def _scoped(source: str) -> str:
    """Move a leading global inline flag group like `(?i)` into a scoped one, `(?i:...)`."""
    match = re.match(r"\(\?([aiLmsux]+)\)", source)
    if match:
        return f"(?{match.group(1)}:{source[match.end():]})"
    return source
