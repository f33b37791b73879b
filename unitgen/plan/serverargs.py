"""What unitgen adds to a server's own ``args``, as the backend table says it,
only where the spec's args do not already say it (in any spelling the server's
parser reads): the GPU defaults, and the names a gateway reaches it by."""

from __future__ import annotations

from unitgen.spec.argscan import find_options
from unitgen.spec.backends import Backend
from unitgen.spec.model import InstanceSpec

__all__ = ["gpu_defaults", "served_names"]


def gpu_defaults(backend: Backend, args: tuple[str, ...], count: int) -> tuple[str, ...]:
    """What users expect from the GPU count: tensor parallel over all of them
    (vLLM, SGLang), every layer offloaded (llama-server, llama-box)."""
    use = backend.gpu_use
    if use is None or count < use.min_count or find_options(args, use.flags, backend.syntax):
        return args
    return (*args, *(w.replace("{count}", str(count)) for w in use.words))


def served_names(spec: InstanceSpec, backend: Backend, args: tuple[str, ...]) -> tuple[str, ...]:
    """A gateway reaches an instance by its route names (its ``name``, its
    ``aliases``), whether it runs on this host (``gateway = ...``) or on another
    (the fleet's ``upstreams``, which this spec cannot know of): a server that
    answers 404 to any other ``model`` (vLLM) is always told them, and its
    model's own name, so clients of its own port keep working. Servers that
    accept any name (llama-server, llama-box, SGLang, vox-box) get nothing;
    neither does one whose args name them."""
    flag = backend.served_names_flag
    if flag is None or find_options(args, (flag,), backend.syntax,
                                    many=backend.served_names_many):
        return args
    names = [spec.name, *spec.aliases]
    if spec.model and spec.model not in names:
        names.append(spec.model)
    if not backend.served_names_many:
        names = names[:1]
    return (*args, flag, *names)
