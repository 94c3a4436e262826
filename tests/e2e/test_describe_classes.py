"""Issue 29 against a REAL Label Studio: what the team wrote in its project (a ``<Choice hint>``, an aliased
``<Choice>``'s value, the labelling instructions) reaches the prompts of every LLM member and the scorers'
label texts, by default.

The real backend (gunicorn) trains a project whose mixture is an ``openai`` member (a real OpenAI-compatible
HTTP server on a tiny local Llama, which keeps every request body), an ``hf`` member (the same tiny Llama in
the backend's process) and an ``embedding`` scorer whose label texts are the descriptions. The server's
requests show what the backend itself sent. The ``hf`` and ``vllm`` prompts and the scorer's label texts are
then rebuilt the way the service builds them (:meth:`Runtime.mixture_for` over the backend's own state: the
task framing the training job stored, the label config's hints read back from Label Studio) and decoded. vLLM
itself is not installed here: its member's prompt is the token ids its ``_annotate`` hands to vLLM
(:func:`molal.annotators.vllm.render_prompt_ids`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molal.demo import connect_backend, label_seeds, start_training, wait_job

from ..llm_server import TinyLMServer, build_tiny_lm

HINTS = {"human": "asks for a person, a group of people or an organisation",
         "numeric": "asks for a number such as a date, a count or an amount"}
#: an aliased <Choice>: the class is "location", people see "Place or region", and the hint says more
PLACE = ("Place or region", "asks where something is")
INSTRUCTIONS = "<p>Label the kind of answer each <b>question</b> asks for.</p>"
FRAMING = "Label the kind of answer each question asks for."
CLASSES = ["human", "location", "numeric"]

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single">'
          f'<Choice value="human" hint="{HINTS["human"]}"/>'
          f'<Choice value="{PLACE[0]}" alias="location" hint="{PLACE[1]}"/>'
          f'<Choice value="numeric" hint="{HINTS["numeric"]}"/>'
          '</Choices></View>')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


@pytest.fixture(scope="module")
def server(tiny):
    with TinyLMServer(tiny) as srv:
        yield srv


def _rows(shared_data: Path, n_per_class: int = 15) -> list[dict]:
    out: dict[str, list[dict]] = {c: [] for c in CLASSES}
    for line in (shared_data / "trec" / "test.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["label"] in out and len(out[r["label"]]) < n_per_class:
            out[r["label"]].append(r)
    return [r for c in CLASSES for r in out[c]]


def test_hints_and_instructions_reach_every_member(ls_client, backend, server, tiny, shared_data, tmp_path):
    from molal.annotators import Mixture
    from molal.annotators.vllm import render_prompt_ids
    from molal.config import get_settings
    from molal.service.labelconfig import parse_label_config
    from molal.service.pipeline import Service

    mix_path = tmp_path / "mixture.toml"
    mix_path.write_text(
        f'[[annotator]]\ntype = "openai"\nname = "tiny-chat"\nbase_url = "{server.base_url}"\nmodel = "tiny-llama"\n'
        'api = "chat"\nconcurrency = 2\n\n'
        f'[[annotator]]\ntype = "hf"\nname = "tiny-hf"\nmodel = "{tiny}"\nchat = true\n\n'
        '[[annotator]]\ntype = "embedding"\nname = "emb-desc"\ntemplates = ["{description}"]\n')
    rows = _rows(shared_data)
    proj = ls_client.projects.create(title="e2e described classes", label_config=CONFIG,
                                     expert_instruction=INSTRUCTIONS)
    pid = int(proj.id)
    res = ls_client.projects.import_tasks(id=pid, request=[{"text": r["text"]} for r in rows], return_task_ids=True)
    ids = [int(t) for t in (res.task_ids if hasattr(res, "task_ids") else res["task_ids"])]
    from molal.service.store import ProjectState

    st = ProjectState(backend.model_dir, pid)
    st.set_setting("mixture", str(mix_path))
    st.set_setting("molam_candidates", "lr_1,best_single")  # the job stays short: prompts are what is tested
    ml_id = connect_backend(ls_client, pid, backend.url)
    seeds = [i for k in range(len(CLASSES)) for i in ids[k * 15:k * 15 + 5]]
    label_seeds(ls_client, seeds, {t: r["label"] for t, r in zip(ids, rows, strict=True)})
    before = len(server.bodies)
    job = wait_job(backend.url, start_training(ls_client, ml_id, backend.url, pid), timeout=600)
    assert job["status"] == "succeeded", job

    # 1. the backend's openai member: every chat request it sent frames the task and describes every class
    texts = [r["text"] for r in rows]
    sent = ["\n".join(m["content"] for m in b["messages"]) for b in server.bodies[before:] if "messages" in b]
    sent = [u for u in sent if any(t in u for t in texts)]  # not the server's feature probe
    assert len(sent) >= len(rows), len(sent)
    for user in sent:
        assert FRAMING in user, user
        assert "<b>" not in user and "<p>" not in user  # the instructions as plain text
        for c, h in HINTS.items():
            assert f"{c}: {h}" in user, user
        assert f"location: {PLACE[0]}: {PLACE[1]}" in user, user

    # 2. the service's own mixture for this project, from the backend's state and Label Studio's config
    proj = ls_client.projects.get(id=pid)
    spec = parse_label_config(proj.label_config)
    assert spec.description_map == {**HINTS, "location": f"{PLACE[0]}: {PLACE[1]}"}
    svc = Service(get_settings(model_dir=backend.model_dir))
    state = svc.store.project(pid)
    mixture = svc.mixture_for(state, spec.classes, descriptions=spec.description_map)
    assert mixture is not None and mixture.task == FRAMING  # stored with the model the job published
    text = rows[0]["text"]
    by_name = {a.name: a for a in mixture.annotators}
    hf = by_name["tiny-hf"]
    tok, _ = hf._load()  # the member's own tokenizer and model, as its _annotate uses them
    hf_prompt = tok.decode(hf.prompt_ids(text, list(spec.classes), mixture.descriptions))
    assert FRAMING in hf_prompt and all(h in hf_prompt for h in HINTS.values()) and PLACE[1] in hf_prompt, hf_prompt
    emb = by_name["emb-desc"]
    label_texts = emb.class_prompts(list(spec.classes), mixture.descriptions)
    assert label_texts == [[HINTS["human"]], [f"{PLACE[0]}: {PLACE[1]}"], [HINTS["numeric"]]]

    # 3. a vllm member in a project like this one gets the same context the same way (Mixture.with_context)
    vpath = tmp_path / "vllm.toml"
    vpath.write_text(f'[[annotator]]\ntype = "vllm"\nname = "v"\nmodel = "{tiny}"\nchat = true\n')
    vmix = Mixture.from_config(vpath).with_context(spec.description_map, mixture.task)
    (v,) = vmix.annotators
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)
    v_prompt = tok.decode(render_prompt_ids(tok, v.prompt, text, list(spec.classes), vmix.descriptions, chat=True))
    assert FRAMING in v_prompt and all(h in v_prompt for h in HINTS.values()) and PLACE[1] in v_prompt, v_prompt
