"""What each number and path in the config may be: declared once, beside its schema field,
and checked in one place.

A field declares its domain with `in_domain`:

    rows: Optional[int] = in_domain(640, Range(gt=0, null="all"))

`check_domains` walks a typed config (nested dataclasses) and refuses the first value
outside its field's domain with one line naming the key, the domain and the value:

    config key 'eval.rows': must be > 0 or null (all), got -1

A value with a special meaning gets its own spelling (null, with what it means), never a
number that slicing or a comparison happens to accept. Relations between keys (a batch no
larger than the buffer, k no larger than the SAE) are not domains: the schema checks them
after this. Closed choices are the schema's types (`Choice` Enums): OmegaConf checks them
as Hydra composes, `check_domains` for a config built in Python.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from saesweep.errors import UserError

DOMAIN = "domain"  # the dataclass field metadata key


class Choice(str, enum.Enum):
    """A closed choice: a schema field typed with a subclass accepts only its members' names,
    and OmegaConf refuses anything else, naming the key and the valid values. A member is
    its spelling everywhere else: it equals, hashes, prints, formats, serialises to JSON and
    unpickles as that plain string, so code compares it with "auto". Checkpoint data goes
    through `plain` (torch's weights-only loader refuses even that pickle's str call)."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __reduce_ex__(self, protocol: object) -> tuple:
        return str, (self.value,)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def plain(data: Any) -> Any:
    """A copy of nested dicts and lists with every Choice as its plain string: what a
    checkpoint stores (torch's weights-only loader accepts no other class)."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(plain(v) for v in data)
    return data.value if isinstance(data, Choice) else data


class Domain:
    """A set of valid values for one config key."""

    null: Optional[str] = None  # what null means where it is allowed; None: null is refused

    def describe(self) -> str:
        """'must be ...' for the error line, null's meaning included."""
        raise NotImplementedError

    def problem(self, value: Any) -> Optional[str]:
        """None if `value` (not null) is in the domain, else a few words on why not (may be '')."""
        raise NotImplementedError

    def check(self, key: str, value: Any) -> None:
        if value is None:
            if self.null is None:
                raise UserError(f"config key '{key}': {self.describe()}, got null")
            return
        why = self.problem(value)
        if why is not None:
            raise UserError(f"config key '{key}': {self.describe()}, got {shown(value)}{why}")

    def or_null(self) -> str:
        return f" or null ({self.null})" if self.null is not None else ""


def shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def num(bound: float) -> str:
    """A bound as written in a config: 1, 0.5, 4294967296 (not 4.29497e+09)."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


@dataclass(frozen=True)
class Range(Domain):
    """A finite number within bounds: ge/gt below, le/lt above (each optional)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    null: Optional[str] = None
    auto: Optional[str] = None  # what the word auto means where it is allowed; None: refused

    def describe(self) -> str:
        low = f"[{num(self.ge)}" if self.ge is not None else (f"({num(self.gt)}" if self.gt is not None else None)
        high = f"{num(self.le)}]" if self.le is not None else (f"{num(self.lt)})" if self.lt is not None else None)
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        elif high:
            text = f"{'<=' if self.le is not None else '<'} {high[:-1]}"
        else:
            text = "a finite number"
        auto = f" or auto ({self.auto})" if self.auto is not None else ""
        return f"must be {text}{auto}{self.or_null()}"

    def problem(self, value: Any) -> Optional[str]:
        if self.auto is not None and value == "auto":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ""
        if isinstance(value, float) and not math.isfinite(value):
            return " (not a finite number)"
        # Written as what must hold, so that NaN fails every bound.
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else ""


@dataclass(frozen=True)
class Items(Domain):
    """A list whose every item is in `item`, with `length` items if given (at least one otherwise)."""

    item: Range
    length: Optional[int] = None
    null: Optional[str] = None

    def describe(self) -> str:
        count = f"{self.length} numbers" if self.length is not None else "a non-empty list of numbers"
        return f"must be {count}, each {self.item.describe().removeprefix('must be ')}{self.or_null()}"

    def problem(self, value: Any) -> Optional[str]:
        if not isinstance(value, (list, tuple)):
            return ""
        items = list(value)
        if (len(items) != self.length) if self.length is not None else not items:
            return ""
        return None if all(v is not None and self.item.problem(v) is None for v in items) else ""


@dataclass(frozen=True)
class SliceSpec(Domain):
    """The arguments of Python's slice() as a list of one to three items, each an integer or
    null ([stop], [start, stop] or [start, stop, step]); the step, if given, above 0.
    SAELens's seqpos_slice, which it also passes to slice()."""

    null: Optional[str] = None

    def describe(self) -> str:
        what = "[stop], [start, stop] or [start, stop, step] as in Python's slice(), each an integer or null, step > 0"
        return f"must be {what}{self.or_null()}"

    def problem(self, value: Any) -> Optional[str]:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 3:
            return ""
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
            return ""
        if len(value) == 3 and value[2] is not None and value[2] <= 0:
            return " (the step)"
        return None


@dataclass(frozen=True)
class Folder(Domain):
    """A directory path (~ expanded). `read`: it must exist already. Otherwise it is written,
    so nothing on the way may be a file and the nearest existing folder must be writable;
    `new`: it must not exist yet either (created whole)."""

    read: bool = False
    new: bool = False
    null: Optional[str] = None

    def describe(self) -> str:
        if self.read:
            what = "an existing directory"
        elif self.new:
            what = "a path that does not exist yet, in a writable directory"
        else:
            what = "a directory (existing, or one that can be created)"
        return f"must be {what}{self.or_null()}"

    def problem(self, value: Any) -> Optional[str]:
        if not str(value):
            return " (empty)"
        path = Path(str(value)).expanduser()
        if path.exists():
            if self.new:
                return " (it exists)"
            return None if path.is_dir() else " (not a directory)"
        if self.read:
            return " (does not exist)"
        above = path.absolute().parent
        while not above.exists():
            above = above.parent
        if not above.is_dir():
            return f" ({above} is a file)"
        if not os.access(above, os.W_OK | os.X_OK):
            return f" ({above} is not writable)"
        return None


@dataclass(frozen=True)
class TokenSpec(Domain):
    """A special token by name, a token id, or null (dataset.prepend_bos decides)."""

    names: Sequence[str]
    null: Optional[str] = "dataset.prepend_bos decides"

    def describe(self) -> str:
        return f"valid: {', '.join(self.names)}, null, or a token id >= 0"

    def check(self, key: str, value: Any) -> None:
        # One message for every bad value, as the valid spellings are the useful part.
        is_id = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not (value is None or is_id or value in self.names):
            raise UserError(f"config key '{key}': {value!r}; {self.describe()}")


def in_domain(default: Any, domain: Domain) -> Any:
    """A dataclass field with `default` (a list is copied per instance) and its domain."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={DOMAIN: domain})
    return dataclasses.field(default=default, metadata={DOMAIN: domain})


@functools.cache
def choice_fields(cls: type) -> dict[str, type[Choice]]:
    """Fields of dataclass `cls` typed with a Choice (alone, Optional, or a list of them)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        for t in (hint, *typing.get_args(hint)):
            if isinstance(t, type) and issubclass(t, Choice):
                out[name] = t
    return out


def check_choice(key: str, value: Any, choice: type[Choice]) -> None:
    """What OmegaConf checks when it composes, for a config built in Python."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item is not None and item not in choice.names():
            raise UserError(f"config key '{key}': valid: {', '.join(choice.names())}; got {item!r}")


def check_domains(node: Any, prefix: str = "") -> None:
    """Refuse the first value of `node` (a typed config, nested dataclasses included) that is
    outside its field's domain or choice. `prefix`: where `node` sits, e.g. 'sae.'."""
    choices = choice_fields(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        domain = f.metadata.get(DOMAIN)
        if domain is not None:
            domain.check(f"{prefix}{f.name}", value)
        elif f.name in choices:
            check_choice(f"{prefix}{f.name}", value, choices[f.name])
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_domains(value, f"{prefix}{f.name}.")
