"""A bounded schemathesis run against the server's OpenAPI schema: whatever it sends (valid and
invalid by the schema, against unknown and live sessions), no 5xx and no traceback.

schemathesis' own pytest plugin does not load under pytest 9, so operations and strategies are
driven directly with hypothesis. Negative cases include requests stripped of the token (401).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis import GenerationMode  # noqa: E402
from test_server import TOKEN_A, ServerProcess  # noqa: E402

MAX_EXAMPLES = 10  # per operation, generation mode and session kind
TIME_BUDGET_S = 600.0


@pytest.fixture(scope="module")
def schema_server(tiny_checkpoint, tmp_path_factory):
    srv = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("schema"), token=TOKEN_A, max_sessions=4,
                        max_request_mb=4, heartbeat_s=1.0).start()
    yield srv
    srv.stop()


def test_no_request_makes_the_server_fail(schema_server):
    from medsam_slicer.server.client import RemoteEngine

    live = RemoteEngine(schema_server.url, token=TOKEN_A).open_session(
        np.arange(2 * 24 * 24, dtype=np.int16).reshape(2, 24, 24), "mr")
    schema = schemathesis.openapi.from_url(f"{schema_server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {TOKEN_A}"}
    started = time.monotonic()
    statuses, failures = {}, []
    with requests.Session() as http:
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12, [op.label for op in operations]
        for op in operations:
            has_session = "{session_id}" in op.path
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for path_parameters in ([None, {"session_id": live.session_id}] if has_session else [None]):
                    strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)

                    @hypothesis.given(case=strategy)
                    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                                         suppress_health_check=list(hypothesis.HealthCheck),
                                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
                    def run(case):
                        if time.monotonic() - started > TIME_BUDGET_S:
                            return
                        response = case.call(base_url=schema_server.url, session=http, headers=headers, timeout=60)
                        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                        if response.status_code >= 500 or "Traceback" in response.text:
                            failures.append(f"{op.label} {mode.value}: {response.status_code} {response.text[:200]}")

                    try:
                        run()
                    except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters)
                        assert mode is GenerationMode.NEGATIVE
    live.close()
    print(f"schemathesis: {sum(statuses.values())} requests, statuses {sorted(statuses.items())}")
    assert not failures, failures[:5]
    assert sum(statuses.values()) >= 100, statuses
    assert any(400 <= s < 500 for s in statuses) and any(s < 300 for s in statuses), statuses
