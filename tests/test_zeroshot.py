"""Zero-shot accuracy through lm-evaluation-harness on a local task (offline), API and CLI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from gradprobe import cli, jobs, zeroshot  # noqa: E402
from tests.text_helpers import char_tokenizer  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
    {"question": "Snow is", "choices": ["white", "black"], "label": 0},
    {"question": "Two plus two is", "choices": ["five", "four"], "label": 1},
    {"question": "Grass is", "choices": ["green", "red"], "label": 0},
    {"question": "The sun rises in the", "choices": ["west", "east"], "label": 1},
]


def tokenizer():
    """The character tokenizer with an end-of-text token (lm-eval's HFLM needs one as its prefix)."""
    tok = char_tokenizer()
    tok.eos_token = "[UNK]"
    return tok


def write_task(root, name: str = "gp_local") -> str:
    """A multiple-choice lm-eval task over a JSON file, as lm-eval's --include_path expects."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return name


@pytest.fixture
def local_index_only(monkeypatch):
    """Index only the --tasks-include directory: lm-eval's ~15k built-in task files take minutes to
    index on a loaded 2-core machine and none of them is needed by these tests."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda include_path=None, include_defaults=True, **kw: real(include_path=include_path,
                                                                                   include_defaults=False, **kw))


def reference_acc(model, tok) -> float:
    """Plain re-implementation: pick the choice with the larger summed log-likelihood given the question
    (continuation = lm-eval's default target delimiter " " + the choice)."""
    correct = 0
    for d in DOCS:
        ctx = tok(d["question"])["input_ids"]
        lls = []
        for c in d["choices"]:
            full = tok(d["question"] + " " + c)["input_ids"]
            ids = torch.tensor([full])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            cont = range(len(ctx), len(full))
            lls.append(sum(float(logp[i - 1, full[i]]) for i in cont))
        correct += int(max(range(len(lls)), key=lls.__getitem__) == d["label"])
    return correct / len(DOCS)


@pytest.mark.slow  # lm-eval's evaluation loop: ~20 s on 2 cores
def test_local_task_on_tiny_model_matches_reference(tmp_path):
    name = write_task(tmp_path / "tasks")
    plan = zeroshot.prepare(name, include_path=tmp_path / "tasks")
    model, tok = tiny_llama(vocab=256), tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = zeroshot.evaluate(model, tok, plan)
    assert res.tasks == [name]
    acc = res.value(name, "acc")
    assert acc == pytest.approx(reference_acc(model, tok))
    assert [s.samples for s in res.scores if s.metric == "acc"] == [len(DOCS)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # evaluated, not changed
    lines = zeroshot.table({"dense": res})
    assert lines[2].startswith(f"| {name} | acc | {acc:.4f}")


def test_prepare_errors_are_clear_and_early(tmp_path, local_index_only):
    with pytest.raises(zeroshot.ZeroShotError, match="not a directory"):
        zeroshot.prepare("x", include_path=tmp_path / "missing")
    write_task(tmp_path / "tasks")
    with pytest.raises(zeroshot.ZeroShotError, match="unknown lm-eval task.*gp_locl.*did you mean.*gp_local"):
        zeroshot.prepare("gp_locl", include_path=tmp_path / "tasks")
    with pytest.raises(zeroshot.ZeroShotError, match="no task names"):
        zeroshot.prepare(" , ")
    with pytest.raises(zeroshot.ZeroShotError, match="limit"):
        zeroshot.prepare("gp_local", include_path=tmp_path / "tasks", limit=0)


def test_hub_task_offline_fails_fast_with_one_line(tmp_path):
    # a hub data set that is not cached: a local YAML naming it keeps the check off lm-eval's big index
    (tmp_path / "hub.yaml").write_text(
        "task: gp_hub\ndataset_path: gradprobe-test/definitely-not-cached\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )
    with pytest.raises(zeroshot.ZeroShotError) as exc:
        zeroshot.prepare("gp_hub", include_path=tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "gradprobe-test/definitely-not-cached" in msg and "HF_HUB_OFFLINE" in msg


def test_cli_eval_tasks_bad_task_exits_2_before_loading(tmp_path, capsys, monkeypatch, local_index_only):
    write_task(tmp_path / "tasks")
    loaded = []
    monkeypatch.setattr(jobs, "_load", lambda job: loaded.append(1))
    rc = cli.main(["eval", "--tasks", "nope_task", "--tasks-include", str(tmp_path / "tasks"), "--device", "cpu"])
    assert rc == 2 and not loaded
    err = capsys.readouterr().err
    assert "unknown lm-eval task" in err
    rc = cli.main(["prune", "--eval-tasks", "nope_task", "--tasks-include", str(tmp_path / "tasks"),
                   "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 2 and not loaded and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_eval_with_local_task(tmp_path, capsys, monkeypatch):
    name = write_task(tmp_path / "tasks")
    model, tok = tiny_llama(vocab=256), tokenizer()
    monkeypatch.setattr(jobs, "_load", lambda job: (model, tok))
    monkeypatch.setattr("gradprobe.data.eval_ids", lambda tok, src: torch.randint(0, 96, (600,)))
    rc = cli.main(["eval", "--tasks", name, "--tasks-include", str(tmp_path / "tasks"), "--device", "cpu",
                   "--eval-context", "64", "--eval-windows", "2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["zeroshot"]["model"]["scores"][0]["task"] == name
    assert out["zeroshot"]["model"]["scores"][0]["value"] == pytest.approx(reference_acc(model, tok))
    assert "value" in out  # the perplexity sits next to it


@pytest.mark.slow
def test_embedded_model_local_task(tmp_path):
    from gradprobe import io

    name = write_task(tmp_path / "tasks")
    model, tok = io.load_model(None)
    res = zeroshot.evaluate(model, tok, zeroshot.prepare(name, include_path=tmp_path / "tasks"))
    assert res.value(name, "acc") == pytest.approx(reference_acc(model, tok))


@pytest.mark.slow
def test_cli_prune_eval_tasks_in_the_run_report(tmp_path, capsys):
    from tests.text_helpers import SAMPLE_TEXT
    from tests.tiny_models import prune_argv

    name = write_task(tmp_path / "tasks")
    model_dir, text = tmp_path / "tiny", tmp_path / "text.txt"
    tiny_llama(num_layers=2, hidden=32, intermediate=64, vocab=128, max_pos=128).save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    text.write_text(SAMPLE_TEXT)
    out = tmp_path / "pruned"
    argv = prune_argv(model_dir, text, out, "--eval", str(text), "--eval-context", "32", "--eval-windows", "2",
                      "--eval-tasks", name, "--tasks-include", str(tmp_path / "tasks"), "--no-plot")
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity: dense" in printed and f"| {name} | acc |" in printed
    run = json.loads((out / "gradprobe_run.json").read_text())
    assert set(run["zeroshot"]) == {"dense", "pruned"}
    report = json.loads((out / "prune_report.json").read_text())
    assert report["zeroshot"] == run["zeroshot"]
    md = (out / "prune_report.md").read_text()
    assert "## zero-shot accuracy" in md and f"| {name} | acc |" in md
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(out)
    acc = run["zeroshot"]["pruned"]["scores"][0]["value"]
    assert acc == pytest.approx(reference_acc(pruned, tokenizer()))
