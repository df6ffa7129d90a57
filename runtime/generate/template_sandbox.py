"""Chat templates rendered in a child process: a bundle's template is code from whoever made the model.

jinja2's sandbox stops a template from reaching Python's internals, but not from looping for hours
(`{% for i in range(100000) %}{% for j in range(100000) %}...`), computing `9**(9**9)` or building a
gigabyte string. So templates run here, in a child process that chat_template.TemplateRenderer starts,
feeds one request per line and kills when a render overruns its time: nothing stays spinning in the
caller. Inside, the child also refuses the cheap bombs with a clear message (huge powers, repetitions
and concatenations, `lipsum`), caps its address space (a MemoryError is a clear error too) and the
rendered text's length, and dies with its parent.

Protocol (JSON, one object per line): the child writes {"ready": true} once, then for each request
{"template", "context", "max_chars"} answers {"text": ...} or {"error": ..., "refused": bool}, where
`refused` marks the template's own raise_exception (it refuses the conversation, e.g. roles out of order).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from functools import lru_cache
from typing import Any

MAX_TEMPLATE_VALUE = 1 << 20  # characters (or items) of any string or list a template builds
MAX_POWER_BITS = 1 << 16  # bits of an integer a template may compute with **
ADDRESS_SPACE_LIMIT = 1 << 30  # bytes of virtual memory for the child (Python and jinja2 need ~40 MB)


class TemplateRefused(Exception):
    """raise_exception() in the template: it refuses this conversation."""


class TemplateTooBig(Exception):
    """The template built a value or an output larger than the limits."""


def _raise_exception(message: str):
    raise TemplateRefused(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _lipsum(*args: Any, **kwargs: Any) -> str:
    raise TemplateTooBig("the chat template calls lipsum(), which chat templates may not use")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEMPLATE_VALUE:
        raise TemplateTooBig(f"the chat template builds a value of {len(value)} items (at most {MAX_TEMPLATE_VALUE})")
    return value


def make_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with the operators that can blow up checked before they run."""

        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            if (
                operator == "**"
                and isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and abs(left) > 1
                and abs(left).bit_length() * right > MAX_POWER_BITS
            ):
                raise TemplateTooBig(
                    f"the chat template computes an integer of about {abs(left).bit_length() * right} "
                    f"bits ({left} ** {right})"
                )
            if operator == "*":
                sequence, count = (left, right) if isinstance(right, int) else (right, left)
                if (
                    isinstance(sequence, (str, list, tuple))
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_TEMPLATE_VALUE
                ):
                    raise TemplateTooBig(f"the chat template repeats a value {count} times")
            return _sized(super().call_binop(context, operator, left, right))

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
    env.globals["lipsum"] = _lipsum
    return env


@lru_cache(maxsize=4)
def compile_template(template: str):
    return make_environment().from_string(template)


def render(template: str, context: dict[str, Any], max_chars: int) -> str:
    """The template's text for `context`, streamed so that an overlong output stops early."""
    parts, length = [], 0
    for part in compile_template(template).generate(**context):
        length += len(part)
        if length > max_chars:
            raise TemplateTooBig(f"the chat template's output is longer than {max_chars} characters")
        parts.append(part)
    return "".join(parts)


def answer(request: dict[str, Any]) -> dict[str, Any]:
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return {"text": render(request["template"], request["context"], request["max_chars"])}
    except TemplateRefused as error:
        return {"error": f"the chat template refused the conversation: {error}", "refused": True}
    except TemplateSyntaxError as error:
        return {"error": f"the bundle's chat template does not compile: {error}", "refused": False}
    except (TemplateTooBig, MemoryError, RecursionError) as error:
        kind = {MemoryError: "ran out of memory", RecursionError: "recursed too deeply"}.get(type(error))
        return {"error": f"the chat template {kind}" if kind else str(error), "refused": False}
    except Exception as error:  # jinja2 runtime errors: undefined names, type errors, sandbox refusals
        return {"error": f"the chat template failed to render: {type(error).__name__}: {error}", "refused": False}


def _limit_child() -> None:
    import resource

    try:  # die with the parent, even mid-render (Linux: prctl PR_SET_PDEATHSIG = 1, SIGKILL = 9)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = ADDRESS_SPACE_LIMIT if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> None:
    _limit_child()
    import jinja2.sandbox  # noqa: F401  (imported before "ready": a render's time is its own)

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            reply = answer(json.loads(line))
        except MemoryError:
            reply = {"error": "the chat template ran out of memory", "refused": False}
        out.write(json.dumps(reply, ensure_ascii=False) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
