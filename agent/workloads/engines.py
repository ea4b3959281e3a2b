"""What serving engines say about their own work, read from their ``/metrics``.

Pure functions: exposition text in, counter values out, and the increase
between two readings. Fetching and scheduling live in ``worksources.py``.

Each engine's documented counters map to our work ``unit`` values. Where the
engine labels a series with the model it serves, the model is kept; every
other label (``finished_reason``, ``version``, ``stop_reason``...) is summed
over, after the increase of each raw series is taken, so a counter reset in
one series never eats another's progress.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client.parser import text_string_to_metric_families

from agent.errors import JoulewardError

# Bounds on what one endpoint may make us hold: distinct raw series kept per
# endpoint, and distinct model names per endpoint (more are summed as "_other").
MAX_SERIES = 2048
MAX_MODELS = 32
OTHER_MODEL = "_other"
MODEL_NAME_MAX_LEN = 256


class WorkSourceError(JoulewardError):
    """An engine's metrics endpoint could not be read or made no sense."""


class Engine(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    TRITON = "triton"
    LLAMACPP = "llamacpp"


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """One exposed sample name and the work unit it counts."""

    sample: str
    unit: str
    model_label: str | None  # the label naming the served model, where the engine sets one


def _spec(sample: str, unit: str, model_label: str | None = None) -> CounterSpec:
    return CounterSpec(sample, unit, model_label)


# By the engines' documentation (docs/jobs.md, "Work units", lists the sources).
ENGINE_COUNTERS: dict[Engine, tuple[CounterSpec, ...]] = {
    Engine.VLLM: (
        _spec("vllm:prompt_tokens_total", "tokens_prompt", "model_name"),
        _spec("vllm:generation_tokens_total", "tokens_generated", "model_name"),
        _spec("vllm:request_success_total", "requests", "model_name"),
    ),
    Engine.SGLANG: (
        _spec("sglang:prompt_tokens_total", "tokens_prompt", "model_name"),
        _spec("sglang:generation_tokens_total", "tokens_generated", "model_name"),
        _spec("sglang:num_requests_total", "requests", "model_name"),
    ),
    # TGI has no token counters: the per-request histograms' _sum is the total.
    # Its counters are exposed without a _total suffix by older releases.
    Engine.TGI: (
        _spec("tgi_request_input_length_sum", "tokens_prompt"),
        _spec("tgi_request_generated_tokens_sum", "tokens_generated"),
        _spec("tgi_request_success", "requests"),
        _spec("tgi_request_success_total", "requests"),
    ),
    # Triton counts requests and inferences (a batched request is many
    # inferences); it has no notion of tokens in its core metrics.
    Engine.TRITON: (
        _spec("nv_inference_request_success", "requests", "model"),
        _spec("nv_inference_count", "inferences", "model"),
    ),
    # llama.cpp's server has no request counter (requests_processing is a gauge).
    Engine.LLAMACPP: (
        _spec("llamacpp:prompt_tokens_total", "tokens_prompt"),
        _spec("llamacpp:tokens_predicted_total", "tokens_generated"),
    ),
}

_SPECS_BY_SAMPLE: dict[str, tuple[Engine, CounterSpec]] = {
    spec.sample: (engine, spec) for engine, specs in ENGINE_COUNTERS.items() for spec in specs
}
_NAME_END = frozenset(" {\t")

# A raw series: (unit, model, the sample name and every label, sorted).
SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class EngineReading:
    """One scrape of one endpoint: which engine, and its raw counter values."""

    engine: Engine
    series: dict[SeriesKey, float]


def _wanted_lines(text: str, engine: Engine | None) -> str:
    """Only the sample lines of counters we know: an engine exposes hundreds of
    histogram buckets we do not need, and parsing them would cost most of the time."""
    names = [s.sample for s in ENGINE_COUNTERS[engine]] if engine else list(_SPECS_BY_SAMPLE)
    first = {name[0] for name in names}
    kept = []
    for line in text.splitlines():
        line = line.lstrip()
        if not line or line[0] not in first:
            continue
        for name in names:
            if line.startswith(name) and len(line) > len(name) and line[len(name)] in _NAME_END:
                kept.append(line)
                break
    return "\n".join(kept) + "\n"


def parse_exposition(text: str, engine: Engine | None = None) -> EngineReading:
    """The known work counters in Prometheus text exposition.

    ``engine`` None detects it: the engine whose counters the text holds (the
    first in ``Engine`` order if several do). Raises WorkSourceError when the
    text holds no known counter or does not parse."""
    try:
        families = list(text_string_to_metric_families(_wanted_lines(text, engine)))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on garbage
        raise WorkSourceError(f"not Prometheus text exposition: {type(exc).__name__}") from None
    found: dict[Engine, dict[SeriesKey, float]] = {}
    models: dict[Engine, set[str]] = {}
    for family in families:
        for sample in family.samples:
            known = _SPECS_BY_SAMPLE.get(sample.name)
            if known is None:
                continue
            sample_engine, spec = known
            if engine is not None and sample_engine != engine:
                continue
            value = float(sample.value)
            if not math.isfinite(value) or value < 0:
                continue
            labels = sample.labels
            model = labels.get(spec.model_label, "") if spec.model_label else ""
            model = model[:MODEL_NAME_MAX_LEN]
            seen = models.setdefault(sample_engine, set())
            if model not in seen:
                if len(seen) >= MAX_MODELS:
                    model = OTHER_MODEL
                else:
                    seen.add(model)
            series = found.setdefault(sample_engine, {})
            if len(series) >= MAX_SERIES:
                continue
            key: SeriesKey = (spec.unit, model, (("__name__", sample.name), *sorted(labels.items())))
            series[key] = series.get(key, 0.0) + value
    for candidate in Engine:
        if candidate in found:
            return EngineReading(candidate, found[candidate])
    raise WorkSourceError("no known serving-engine counter in the exposition")


def increase(
    previous: Mapping[SeriesKey, float] | None, current: Mapping[SeriesKey, float]
) -> dict[tuple[str, str], float]:
    """Work done between two readings, by (unit, model); never negative.

    The first reading is the baseline and counts nothing (what an engine did
    before we watched it is not this interval's work). A series that appears
    later started at zero; a series lower than before was reset (the engine
    restarted): its new value is all new work."""
    if previous is None:
        return {}
    out: dict[tuple[str, str], float] = {}
    for key, value in current.items():
        before = previous.get(key)
        delta = value if before is None or value < before else value - before
        if delta > 0:
            unit_model = (key[0], key[1])
            out[unit_model] = out.get(unit_model, 0.0) + delta
    return out
