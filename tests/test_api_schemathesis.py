"""Generated requests from /api/schema/ against the real portal under uvicorn: no 5xx, ever.

Schemathesis builds requests for every documented operation, valid ones (positive) and
invalid ones (negative), sends them over HTTP with an operator's token, and checks each
answer: never a server error, and (for valid requests) the shape the schema documents.
Derandomized and bounded (a few examples per operation), so CI runs the same cases in
about a minute.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from knox.models import AuthToken
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

from tests.conftest import free_port
from tests.live import LivePortal

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EXAMPLES_PER_OPERATION = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "6"))
CHECKS = {GenerationMode.POSITIVE: [not_a_server_error, response_schema_conformance],
          GenerationMode.NEGATIVE: [not_a_server_error, negative_data_rejection]}


@pytest.fixture
def portal(artifact_root, served_deployment, model, operator) -> Iterator[LivePortal]:
    """The portal under uvicorn over a database with a model, an alias and a deployment."""
    from registry import services

    services.do_move_alias(model=model, alias_name="prod", version=served_deployment.version,
                           user=operator)
    live = LivePortal(free_port(), artifact_root).start()
    yield live
    live.stop()


def fuzz(operation, mode: GenerationMode, auth: dict[str, str], seen: Counter) -> None:
    """Send EXAMPLES_PER_OPERATION generated requests; raise on the first failed check."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
              database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(headers=auth, timeout=60)
        seen[response.status_code // 100] += 1
        case.validate_response(response, checks=CHECKS[mode], headers=auth)

    check()


def test_generated_requests_never_get_a_server_error(portal, operator):
    _instance, token = AuthToken.objects.create(user=operator, expiry=None)
    auth = {"Authorization": f"Token {token}"}
    schema = schemathesis.openapi.from_url(f"{portal.url}/api/schema/", headers=auth)
    schema.config.base_url = portal.url
    failures, operations, seen = {}, 0, Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in CHECKS:
            try:
                fuzz(operation, mode, auth, seen)
            except Unsatisfiable:  # nothing to make invalid (a free-form path segment)
                continue
            except Exception as exc:  # collect every operation's failure, then report all
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
    assert failures == {}, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert operations >= 45, "the schema lost operations"
    # It reached the handlers: some requests succeeded, many were refused, none crashed.
    assert seen[2] >= operations and seen[4] >= operations, seen
    assert seen[5] == 0
