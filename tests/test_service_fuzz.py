"""Schemathesis against the service's ``/openapi.json``: generated requests (schema-valid and invalid, for
every operation, with random and with a real collection name) never get a 5xx, and every answer matches
the documented schema (body, content type, status code). Bounded: 15 examples per (operation, mode,
name), derandomized, about 20 s here.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance)

NAME = "breastmnist_28_hog"
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, data_dir):
    from cbmir.app import App, CollectionRef, load_settings
    from cbmir.app.ingesting import ingest_collection
    from cbmir.service import ServiceConfig, create_app

    root = tmp_path_factory.mktemp("fuzz") / "store"
    app = App(load_settings(store_path=root, data_dir=data_dir))
    ingest_collection(app, CollectionRef("breastmnist", 28, "hog"), progress=False)
    api = create_app(app, ServiceConfig(idle_release_s=0, max_upload_bytes=1 << 20))
    yield schemathesis.openapi.from_asgi("/openapi.json", api)
    app.close()


def test_no_5xx_and_answers_match_the_schema(api_schema):
    ran = []
    for result in api_schema.get_all_operations():
        op = result.ok()
        names = (None, {"name": NAME}) if "{name}" in op.path else (None,)
        for mode in GenerationMode:
            for pinned in names:
                @given(case=op.as_strategy(generation_mode=mode, path_parameters=pinned))
                @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                def run(case):
                    case.call_and_validate(checks=CHECKS)
                    ran.append(case.operation.label)

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                    assert mode is GenerationMode.NEGATIVE, op.label
    assert len(set(ran)) == 8, sorted(set(ran))  # every operation (incl. POST / DELETE points) was exercised
