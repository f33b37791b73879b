"""What a spec may add to ``podman run`` (``podman_args``): an
allowlist, not a list of refusals. A container keeps its confinement only
while every option that could lift it is unitgen's: podman has hundreds of
options and several spellings of each (``--opt=v``, ``--opt v``, bundled short
options ``-qd``), and a word that is no option becomes the image. So only the
options below pass, each in a form read one way; the ones unitgen sets itself
are refused naming the key that sets them (``OWNED`` in
:mod:`unitgen.plan.container`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["ALLOWED", "check_podman_args"]

ProblemSink = Callable[[str, str], None]

# name -> takes a value (``--name=value`` or ``--name value``)
ALLOWED: dict[str, bool] = {
    # resources
    "--memory": True, "--memory-reservation": True, "--memory-swap": True, "--cpus": True,
    "--cpuset-cpus": True, "--cpuset-mems": True, "--cpu-shares": True, "--pids-limit": True,
    "--oom-score-adj": True,
    # the process inside: less privilege only (a user, groups, a read-only root)
    "--user": True, "--group-add": True, "--umask": True, "--read-only": False,
    "--read-only-tmpfs": False, "--tmpfs": True, "--init": False, "--tz": True,
    "--hostname": True, "--stop-timeout": True,
    # metadata
    "--label": True, "--annotation": True,
}
_SHORT = {"-u": "--user"}


def check_podman_args(words: tuple[str, ...], owned: Mapping[str, str],
                      problem: ProblemSink) -> None:
    """Refuse every word that is not an allowed option (or its value)."""
    i = 0
    while i < len(words):
        word, key = words[i], f"podman_args[{i}]"
        name = word.split("=", 1)[0] if word.startswith("--") else _SHORT.get(word, word)
        if name in owned:
            problem(key, f"{word!r}: {name} is set by unitgen ({owned[name]})")
        elif name not in ALLOWED:
            problem(key, f"{word!r} is not among the podman options unitgen passes "
                         f"({', '.join(sorted(ALLOWED))}): the others could lift the "
                         "container's confinement, and a word that is no option becomes the "
                         "image; a setting of its own may exist (docs/containers.md)")
        elif ALLOWED[name] and "=" not in word:
            if i + 1 >= len(words):
                problem(key, f"{word!r} needs a value")
            i += 1  # its value: the next word, whatever it is
        elif not ALLOWED[name] and "=" in word and word.split("=", 1)[1] not in ("true",
                                                                                  "false"):
            problem(key, f"{word!r}: {name} takes no value (true or false at most)")
        i += 1
