"""The OpenAI gateway (issue 19) on a real systemd user manager with real
HAProxy, and the official OpenAI SDK as the client: one base URL for every
model, routed by the body's model; replicas, aliases, on-demand members; keys;
deploy and remove while clients stream. The tests are written once for every
target (tests/gateway_cases.py); ``gw`` is this manager (tests/live/conftest.py)."""

from __future__ import annotations

import pytest

from tests.gateway_cases import (  # noqa: F401 - collected here, with this tier's gw
    NEEDS_HAPROXY,
    test_a_bound_on_concurrent_requests_queues_then_answers_429,
    test_a_gateway_and_its_files_are_removed,
    test_deploy_and_remove_while_clients_stream_fail_nothing,
    test_one_endpoint_for_every_model_with_the_openai_sdk,
)

pytestmark = [pytest.mark.systemd, NEEDS_HAPROXY]
