"""What a spec may not ask for, though its author is root-equivalent anyway
(docs/production.md): refusing these costs nothing and keeps a spec's reach to
what its keys say. A command prefix that raises privileges in ``[systemd.*]``,
and variables podman itself reads in the ``env`` of a container instance.
tests/corpus has one file each for the message with its file and key."""

from __future__ import annotations

import pytest

from unitgen.errors import SpecError
from unitgen.plan.instance import resolve
from unitgen.spec.model import parse_spec
from unitgen.targets.systemd.render import spec_problems

SPEC = 'name = "a"\nbackend = "vllm"\nmodel = "m"\n'
IMAGE = 'image = "docker.io/vllm/vllm-openai:v0.11.0"\n'


def directive_problems(section: str, key: str, value: str) -> list[str]:
    spec = parse_spec(f"{SPEC}[systemd.{section}]\n{key} = {value!r}\n", "a.toml")
    return [f"{p.key}: {p.message}" for p in spec_problems(spec)]


@pytest.mark.parametrize("value", [
    "+/bin/sh -c id", "!/bin/sh", "!!/bin/sh", "-+/bin/sh", "@!/bin/sh sh",
    "/bin/true ; +/bin/sh -c id",  # a lone ';' starts another command line
    '"+/bin/sh"', '-"+"/bin/sh',  # quotes are removed before the prefixes are read
    "\\x2b/bin/sh",  # a C escape spells '+'
])
def test_a_prefix_that_raises_privileges_is_refused(value):
    found = directive_problems("service", "ExecCondition", value)
    assert len(found) == 1 and found[0].startswith("systemd.service.ExecCondition: "), found
    assert "runs it with privileges the unit does not give its server" in found[0]


@pytest.mark.parametrize("value", ["/bin/true", "-/bin/true", "@/bin/true true", ":/bin/echo ${X}",
                                   "/bin/echo +x ! y", "/bin/echo \\; +/x"])
def test_other_commands_pass(value):
    assert directive_problems("service", "ExecCondition", value) == []


@pytest.mark.parametrize("name", ["CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF",
                                  "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_HELPER_BINARY_DIR",
                                  "CONTAINER_HOST", "CONTAINER_CONNECTION", "STORAGE_OPTS",
                                  "REGISTRY_AUTH_FILE", "PODMAN_USERNS", "_CONTAINERS_ROOTLESS_UID",
                                  "LD_PRELOAD", "LD_LIBRARY_PATH", "XDG_CONFIG_HOME",
                                  "NOTIFY_SOCKET"])
def test_variables_podman_reads_are_refused_in_a_container_instance(name):
    with pytest.raises(SpecError) as err:
        resolve(parse_spec(f'{SPEC}{IMAGE}[env]\n{name} = "x"\n', "a.toml"))
    [problem] = err.value.problems
    assert problem.key == f"env.{name}"
    assert "podman reads the unit's environment before the container gets it" in problem.message


def test_the_servers_own_variables_pass_and_a_host_server_may_set_any():
    inst = resolve(parse_spec(f'{SPEC}{IMAGE}[env]\nHF_HOME = "/hf"\nTMPDIR = "/scratch"\n',
                              "a.toml"))
    assert inst.container is not None
    assert "HF_HOME" in inst.container.env_names
    host = resolve(parse_spec(f'{SPEC}[env]\nLD_LIBRARY_PATH = "/opt/cuda/lib64"\n', "a.toml"))
    assert ("LD_LIBRARY_PATH", "/opt/cuda/lib64") in host.env
