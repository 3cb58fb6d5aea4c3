"""schemathesis against the service's own OpenAPI: generated requests that fit the schema and
requests that do not, on every route, as the operator and without a token, never get a 500.
Bounded and derandomized examples, so it stays fast and repeatable."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from supercluster.cluster.fleet import init_fleet
from supercluster.service import tenancy
from supercluster.service.app import create_app
from supercluster.service.store import Store

EXAMPLES = 4


@pytest.fixture
def api(service_url):
    store = Store(service_url)
    with store.session() as s:
        token = tenancy.init_operator(s)
    init_fleet(store.fleet, "sim", spec={"gpu_type": "h100", "nodes": 8, "gpus_per_node": 8, "nodes_per_leaf": 4, "leaves_per_pod": 2})
    app = create_app(store=store, rate=1e6, burst=10**6)
    yield schemathesis.openapi.from_asgi("/openapi.json", app), token
    store.dispose()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_route_answers_500(api, mode):
    schema, token = api
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                response = case.call(headers=headers)
                assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:300])
                if not headers:  # no valid token, no answer but 401 (or 429 once the address sent too many)
                    assert response.status_code in (401, 429), (case.method, case.formatted_path, response.status_code)

        check()
        seen.append(operation.label)
    assert len(seen) >= 20  # every route was exercised
