"""What the served replies look like, per adapter, and an alert when that drifts from a baseline.

Per adapter (the base model counts as one, under its served name) the monitor keeps a sliding
window of the last `window` replies: whether each was a refusal (`eval.metrics.is_refusal`, the
detector the eval suite's refusal rate uses), its length in tokens, and its decode time. From
the window come three series, and the feedback up-rate (server-wide, adapter label "*") is the
fourth:

    refusal_rate   share of refusals among the window's replies
    reply_tokens   mean reply length, tokens
    tokens_per_s   reply tokens / decode seconds (per row: a batch's rows share its steps)
    up_rate        share of "up" among the last feedback_window ratings (app.py feeds it)

Drift: each (adapter, series) has a baseline: the value given in the config
(`ServeConfig.drift_baseline`), else the first full window after the server started (a hot swap
keeps it, since a swapped adapter that behaves differently is what the alert is for; the admin
API can reset it). On every full window the relative change |value - baseline| /
max(|baseline|, floor) is compared with the series' threshold; above it, the gauge
`posttrain_drift_alert{adapter, series}` is 1 and one warning is logged for the episode; back
within, the gauge is 0 and one info line closes the episode. The floor (0.1 for the two rates,
1 for the token series) keeps a baseline of zero refusals from turning one refusal into an
infinite change: with the default threshold 0.5, a zero baseline alerts above a 5% refusal rate.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SERIES = ("refusal_rate", "reply_tokens", "tokens_per_s", "up_rate")
FLOORS = {"refusal_rate": 0.1, "up_rate": 0.1, "reply_tokens": 1.0, "tokens_per_s": 1.0}
ALL = "*"  # the adapter label of server-wide series (up_rate)
log = logging.getLogger("posttrain.serve")


def monitor_metrics(registry: CollectorRegistry) -> dict:
    """Per-adapter traffic, window and drift metrics (app.py adds them beside its HTTP metrics)."""
    return {
        "adapter_requests": Counter("posttrain_adapter_requests", "completion requests by adapter (model name) "
                                    "and status", ["adapter", "status"], registry=registry),
        "adapter_latency": Histogram("posttrain_adapter_request_latency_seconds", "completion request latency by "
                                     "adapter (streams: until the last chunk)", ["adapter"], registry=registry,
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)),
        "adapter_tokens": Counter("posttrain_adapter_generated_tokens", "reply tokens by adapter", ["adapter"],
                                  registry=registry),
        "refusals": Counter("posttrain_refusals", "replies the refusal detector flags, by adapter", ["adapter"],
                            registry=registry),
        "w_refusal": Gauge("posttrain_window_refusal_rate", "share of refusals among the adapter's last "
                           "monitor_window replies", ["adapter"], registry=registry),
        "w_tokens": Gauge("posttrain_window_reply_tokens", "mean reply length (tokens) over the adapter's last "
                          "monitor_window replies", ["adapter"], registry=registry),
        "w_speed": Gauge("posttrain_window_tokens_per_second", "reply tokens per decode second over the adapter's "
                         "last monitor_window replies", ["adapter"], registry=registry),
        "w_size": Gauge("posttrain_window_replies", "replies in the adapter's window", ["adapter"],
                        registry=registry),
        "baseline": Gauge("posttrain_drift_baseline", "baseline of each window series (config or first full "
                          "window)", ["adapter", "series"], registry=registry),
        "change": Gauge("posttrain_drift_change", "relative change of the latest full window from the baseline",
                        ["adapter", "series"], registry=registry),
        "alert": Gauge("posttrain_drift_alert", "1 while the series is beyond drift_threshold from its baseline",
                       ["adapter", "series"], registry=registry),
    }


def drift_thresholds(value: float | dict[str, float] | None) -> dict[str, float]:
    """The config's drift_threshold as series -> threshold (a number applies to every series; None: off)."""
    if value is None:
        return {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"drift_threshold: {value} must be > 0 (a relative change, e.g. 0.5)")
        return dict.fromkeys(SERIES, float(value))
    if not isinstance(value, dict):
        raise ValueError(f"drift_threshold: a number or {{series: number}}, got {type(value).__name__}")
    out = {}
    for series, threshold in value.items():
        if series not in SERIES:
            raise ValueError(f"drift_threshold.{series}: unknown series; known: {', '.join(SERIES)}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
            raise ValueError(f"drift_threshold.{series}: {threshold!r} must be a number > 0")
        out[series] = float(threshold)
    return out


def check_baselines(value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    for adapter, series_values in value.items():
        if not isinstance(series_values, dict):
            raise ValueError(f"drift_baseline.{adapter}: a mapping {{series: value}}, got {series_values!r}")
        for series, v in series_values.items():
            if series not in SERIES:
                raise ValueError(f"drift_baseline.{adapter}.{series}: unknown series; known: {', '.join(SERIES)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"drift_baseline.{adapter}.{series}: {v!r} is not a number")
    return value


@dataclass
class _Window:
    replies: collections.deque = field(default_factory=collections.deque)  # (refusal, tokens, seconds)
    refusals: int = 0
    tokens: int = 0
    seconds: float = 0.0


class Monitor:
    """Windows, baselines and drift alerts; thread-safe (replies are recorded from the event loop,
    resets come from admin requests)."""

    def __init__(self, metrics: dict, window: int, thresholds: dict[str, float],
                 baselines: dict[str, dict[str, float]] | None = None):
        self.m, self.size, self.thresholds = metrics, window, thresholds
        self.given = {(a, s): float(v) for a, values in (baselines or {}).items() for s, v in values.items()}
        self.baseline: dict[tuple[str, str], float] = dict(self.given)
        for (adapter, series), value in self.baseline.items():
            self.m["baseline"].labels(adapter, series).set(value)
        self.windows: dict[str, _Window] = {}
        self.alerting: set[tuple[str, str]] = set()
        self.lock = threading.Lock()

    def record(self, adapter: str, text: str, tokens: int, seconds: float | None) -> None:
        """One reply served by `adapter`: counters, its window, and a drift check when the window is full."""
        from posttrain.eval.metrics import is_refusal

        refusal = is_refusal(text)
        self.m["adapter_tokens"].labels(adapter).inc(tokens)
        self.m["refusals"].labels(adapter).inc(int(refusal))
        with self.lock:
            w = self.windows.setdefault(adapter, _Window())
            item = (refusal, tokens, float(seconds or 0.0))
            w.replies.append(item)
            w.refusals, w.tokens, w.seconds = w.refusals + refusal, w.tokens + tokens, w.seconds + item[2]
            if len(w.replies) > self.size:
                old = w.replies.popleft()
                w.refusals, w.tokens, w.seconds = w.refusals - old[0], w.tokens - old[1], w.seconds - old[2]
            n = len(w.replies)
            values = {"refusal_rate": w.refusals / n, "reply_tokens": w.tokens / n}
            if w.seconds > 0:
                values["tokens_per_s"] = w.tokens / w.seconds
            self.m["w_refusal"].labels(adapter).set(values["refusal_rate"])
            self.m["w_tokens"].labels(adapter).set(values["reply_tokens"])
            if "tokens_per_s" in values:
                self.m["w_speed"].labels(adapter).set(values["tokens_per_s"])
            self.m["w_size"].labels(adapter).set(n)
            if n >= self.size:
                self._check(adapter, values)

    def record_up_rate(self, rate: float, full: bool) -> None:
        """The feedback up-rate after a rating; checked for drift once its window is full."""
        if full:
            with self.lock:
                self._check(ALL, {"up_rate": rate})

    def reset_baseline(self, adapter: str) -> None:
        """Forget `adapter`'s baselines (config-given ones too) and its window: the next full window of
        its replies becomes the baseline (after a swap the operator accepts as the new normal)."""
        with self.lock:
            self.windows.pop(adapter, None)
            for key in [k for k in self.baseline if k[0] == adapter]:
                del self.baseline[key]
                self.m["baseline"].remove(*key)
            for key in [k for k in self.alerting if k[0] == adapter]:
                self.alerting.discard(key)
                self.m["alert"].labels(*key).set(0)
                log.info("drift alert cleared for adapter %s, %s: baseline reset", *key)

    def _check(self, adapter: str, values: dict[str, float]) -> None:
        """A full window's values against the baselines (set from this window when there is none)."""
        for series, value in values.items():
            key = (adapter, series)
            if key not in self.baseline:
                self.baseline[key] = value
                self.m["baseline"].labels(adapter, series).set(value)
                log.info("drift baseline for adapter %s, %s: %.4g (its first full window)", adapter, series, value)
            threshold = self.thresholds.get(series)
            if threshold is None:
                continue
            base = self.baseline[key]
            change = abs(value - base) / max(abs(base), FLOORS[series])
            self.m["change"].labels(adapter, series).set(change)
            drifting = change > threshold
            self.m["alert"].labels(adapter, series).set(int(drifting))
            if drifting and key not in self.alerting:
                self.alerting.add(key)
                log.warning("drift alert: adapter %s, %s = %.4g against a baseline of %.4g (relative change %.2f "
                            "> threshold %.2f)", adapter, series, value, base, change, threshold)
            elif not drifting and key in self.alerting:
                self.alerting.discard(key)
                log.info("drift alert over: adapter %s, %s = %.4g (baseline %.4g)", adapter, series, value, base)
