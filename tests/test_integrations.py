"""The training-framework callbacks, for real: a transformers Trainer and a
Lightning Trainer train tiny models built from configs (nothing downloaded)
with the callback, against a real agent and standalone; the job's work units
are the samples and the non-padding tokens the frameworks processed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch", reason="the frameworks: bash scripts/setup-test-env.sh")
transformers = pytest.importorskip("transformers", reason="the frameworks: bash scripts/setup-test-env.sh")
lightning = pytest.importorskip("lightning", reason="the frameworks: bash scripts/setup-test-env.sh")

from agent.integrations import BatchWork, WorkReporter, batch_work  # noqa: E402
from agent.integrations.hf import JoulewardCallback as HFCallback  # noqa: E402
from agent.integrations.lightning import JoulewardCallback as LightningCallback  # noqa: E402
from tests.support import REPO, AgentProcess, metric_sum, wait_until  # noqa: E402
from tests.support.rapl import ConstantPowerRapl  # noqa: E402

VOCAB, SEQ = 256, 32


def token_rows(count: int, seed: int, labels: bool = True) -> tuple[list[dict], int]:
    """Right-padded random sequences of 4..SEQ real tokens, and their real tokens in all."""
    generator = torch.Generator().manual_seed(seed)
    rows, real = [], 0
    for i in range(count):
        length = 4 + (i * 5) % (SEQ - 3)
        mask = (torch.arange(SEQ) < length).long()
        ids = torch.randint(1, VOCAB, (SEQ,), generator=generator) * mask
        row = {"input_ids": ids, "attention_mask": mask}
        if labels:
            row["labels"] = ids.masked_fill(mask == 0, -100)
        rows.append(row)
        real += length
    return rows, real


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frameworks")
    rapl = ConstantPowerRapl(tmp / "sys", 40.0, 6.0).start()
    # A known static power: at constant power the estimator could call all of it idle.
    (tmp / "jouleward.toml").write_text("[idle_power_w]\ncpu = 10.0\ndram = 2.0\n")
    agent = AgentProcess(tmp / "state", sysfs=tmp / "sys", interval_s=0.2, config=tmp / "jouleward.toml")
    # Past the first ticks (baselines of the counters and the scan), so every tick of a run counts.
    wait_until(lambda: metric_sum(agent.metrics(), "jouleward_ticks_total") >= 5, 20, what="five ticks")
    yield agent
    agent.stop()
    rapl.close()


@pytest.fixture(autouse=True)
def one_process_per_node(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def train_hf(tmp_path, callback: HFCallback, rows: list[dict]) -> None:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        run_name="tiny-gpt2",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()


def test_hf_trainer_reports_its_samples_and_tokens_to_the_agent(tmp_path, agent):
    # 8 optimizer steps x 2 accumulated micro-batches x 4 = 64 samples: the whole data set, once.
    rows, real_tokens = token_rows(64, seed=1)
    assert real_tokens < 64 * SEQ  # padding exists, and must not count
    callback = HFCallback(labels={"team": "nlp"}, socket_path=agent.socket_path)
    train_hf(tmp_path, callback, rows)
    summary = callback.summary
    assert summary.mode == "agent" and summary.name == "tiny-gpt2"
    status, job = agent.get(f"/v1/jobs/{summary.job_id}")
    assert status == 200 and job["running"] is False and job["labels"] == {"team": "nlp"}
    assert job["work_units"] == {"samples": 64.0, "tokens": float(real_tokens)}
    total_j = sum(job["energy_j"].values())
    assert total_j > 0 and job["cpu_s"] > 0, json.dumps(job)
    assert job["efficiency"]["energy_per_sample_j"] == pytest.approx(total_j / 64)
    assert job["efficiency"]["energy_per_token_j"] == pytest.approx(total_j / real_tokens)
    assert job["efficiency"]["token_unit"] == "tokens"
    # And `jouleward report` gives the same figures beside codecarbon's columns.
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "report", summary.job_id, "--format", "json"]
        + ["--listen", f"127.0.0.1:{agent.port}", "--control-socket", agent.socket_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert (row["samples"], row["tokens"], row["token_unit"]) == (64.0, float(real_tokens), "tokens")
    assert row["energy_per_sample_j"] == pytest.approx(total_j / 64)


def test_hf_trainer_without_an_agent_measures_standalone(tmp_path):
    rows, real_tokens = token_rows(64, seed=2)
    callback = HFCallback("hf-alone", socket_path=tmp_path / "no-agent.sock")
    train_hf(tmp_path, callback, rows)
    summary = callback.summary
    assert summary.mode == "standalone" and summary.name == "hf-alone"
    assert summary.work_units == {"samples": 64.0, "tokens": float(real_tokens)}
    assert summary.duration_s > 0 and summary.energy_j


class TinyLM(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.embed(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), batch["input_ids"].view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train_lightning(tmp_path, callback: LightningCallback, rows: list[dict], steps: int) -> None:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    trainer.fit(TinyLM(), loader)


def test_lightning_trainer_reports_its_samples_and_tokens_to_the_agent(tmp_path, agent):
    rows, real_tokens = token_rows(12, seed=3, labels=False)
    callback = LightningCallback(socket_path=agent.socket_path)
    train_lightning(tmp_path, callback, rows, steps=3)  # 3 steps x 4 = the 12 rows, once
    summary = callback.summary
    assert summary.mode == "agent" and summary.name == "TinyLM"
    status, job = agent.get(f"/v1/jobs/{summary.job_id}")
    assert status == 200 and job["running"] is False
    assert job["work_units"] == {"samples": 12.0, "tokens": float(real_tokens)}
    assert job["efficiency"]["energy_per_sample_j"] == pytest.approx(sum(job["energy_j"].values()) / 12)


def test_lightning_standalone_counts_every_process_on_the_node(tmp_path, monkeypatch):
    # Two processes on the node (as torchrun says): the local main process reports for both.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    rows, real_tokens = token_rows(8, seed=4, labels=False)
    callback = LightningCallback("pl-alone", socket_path=tmp_path / "no-agent.sock")
    train_lightning(tmp_path, callback, rows, steps=2)
    assert callback.summary.mode == "standalone"
    assert callback.summary.work_units == {"samples": 16.0, "tokens": 2.0 * real_tokens}


def test_what_a_batch_counts():
    ids = torch.ones((3, 5), dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert batch_work({"input_ids": ids, "attention_mask": mask}) == BatchWork(3, 9)
    assert batch_work({"input_ids": ids}) == BatchWork(3, 15)
    assert batch_work({"inputs_embeds": torch.zeros((2, 7, 4)), "attention_mask": torch.ones((2, 7))}) == BatchWork(
        2, 14
    )
    # Images and their labels: samples only. Token ids as a plain tensor: batch x length.
    assert batch_work((torch.zeros((8, 3, 4, 4)), torch.zeros(8, dtype=torch.long))) == BatchWork(8, None)
    assert batch_work(ids) == BatchWork(3, 15)
    assert batch_work(torch.zeros((3, 5))) == BatchWork(3, None)
    assert batch_work(torch.zeros((3, 5), dtype=torch.bool)) == BatchWork(3, None)
    assert batch_work({"labels": "not a tensor"}) == BatchWork(0, None)


def test_counts_are_sent_at_most_once_per_interval_and_all_at_the_end(agent):
    reporter = WorkReporter("r", socket_path=agent.socket_path, report_interval_s=3600)
    reporter.start(world_size=1)
    assert reporter.job is not None
    for _ in range(5):
        reporter.count(BatchWork(4, 100))
        reporter.flush()
    # Nothing sent within the interval: the agent has no work for the job yet.
    assert agent.get(f"/v1/jobs/{reporter.job.job_id}")[1]["work_units"] == {}
    summary = reporter.finish()
    assert summary is not None and summary.work_units == {"samples": 20.0, "tokens": 500.0}
    assert agent.get(f"/v1/jobs/{summary.job_id}")[1]["work_units"] == {"samples": 20.0, "tokens": 500.0}


def test_under_wrap_the_work_goes_to_wraps_job_and_inside_another_job_it_measures_standalone(agent, monkeypatch):
    status, outer = agent.control("POST", "/v1/jobs", {"name": "outer", "pids": [os.getpid()]})
    assert status == 201, outer
    try:
        # `jouleward wrap` tells its command the job: the callback reports there and leaves it running.
        monkeypatch.setenv("JOULEWARD_JOB_ID", outer["id"])
        inner = WorkReporter("inner", socket_path=agent.socket_path)
        inner.start(world_size=1)
        inner.count(BatchWork(8, 300))
        assert inner.finish() is None
        status, job = agent.get(f"/v1/jobs/{outer['id']}")
        assert job["running"] is True and job["work_units"] == {"samples": 8.0, "tokens": 300.0}
        # Without the variable the registration is refused (409: the process is the outer job's).
        monkeypatch.delenv("JOULEWARD_JOB_ID")
        nested = WorkReporter("nested", socket_path=agent.socket_path)
        nested.start(world_size=1)
        nested.count(BatchWork(4, None))
        summary = nested.finish()
        assert summary is not None and summary.mode == "standalone" and summary.work_units == {"samples": 4.0}
        assert agent.get(f"/v1/jobs/{outer['id']}")[1]["work_units"] == {"samples": 8.0, "tokens": 300.0}
    finally:
        agent.control("POST", f"/v1/jobs/{outer['id']}/finish", {})


def test_an_agent_that_goes_away_never_stops_the_training(tmp_path, caplog):
    gone = AgentProcess(tmp_path / "state", interval_s=0.2)
    reporter = WorkReporter("orphan", socket_path=gone.socket_path, report_interval_s=0)
    try:
        reporter.start(world_size=1)
        reporter.count(BatchWork(4, 64))
        reporter.flush()
        status, job = gone.get(f"/v1/jobs/{reporter.job.job_id}")
        assert job["work_units"] == {"samples": 4.0, "tokens": 64.0}
    finally:
        gone.stop()
    for _ in range(3):
        reporter.count(BatchWork(4, 64))
        reporter.flush()
    assert reporter.finish() is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "agent.integrations"]
    assert len(warnings) == 1 and "keeping it for the next report" in warnings[0]
