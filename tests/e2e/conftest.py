"""Session fixtures: ONE real Label Studio (headless, from the cached migrated template) and the real
molal backend under gunicorn, talking over real HTTP on 127.0.0.1. Nothing is mocked."""

from __future__ import annotations

import pytest

from molal.lsprocess import BackendProcess, LabelStudioProcess

#: small student settings so a training job stays short on 2 shared cores
E2E_ENV = {
    "MOLAL_STUDENT_EPOCHS": "1",
    "MOLAL_STUDENT_FREEZE_ENCODER": "true",  # the head on frozen MiniLM embeddings, as `molal demo` trains it
    "MOLAL_STUDENT_MAX_LENGTH": "32",
    "MOLAL_PER_LLM_PREDICTIONS": "true",
    "MOLAL_STRATEGY": "entropy",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``): the browser tests save a screenshot
    when their call phase failed."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    ls = LabelStudioProcess(tmp_path_factory.mktemp("e2e") / "label-studio", username="e2e@molal.local")
    ls.start()
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def backend(label_studio, tmp_path_factory):
    b = BackendProcess(tmp_path_factory.mktemp("e2e-backend") / "model-dir", label_studio_url=label_studio.url,
                       api_key=label_studio.token, workers=2, threads=4, extra_env=E2E_ENV)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def ls_client(label_studio):
    return label_studio.client()
