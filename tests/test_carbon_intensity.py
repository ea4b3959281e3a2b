"""Intensity providers: static, CSV series, and an HTTP API served on loopback."""

import http.server
import json
import threading
import time

import pytest

from agent import config
from agent.carbon import emissions, intensity


def wait_for(predicate, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_static_emissions_equal_kwh_times_intensity_times_pue():
    provider = intensity.from_config(config.CarbonConfig(provider="static", intensity_g_per_kwh=437.5, zone="X"))
    pue = 1.37
    total_j = grams = 0.0
    for tick in range(1000):
        energy_j = 150.0 + (tick % 7) * 13.25  # uneven power from tick to tick
        total_j += energy_j
        grams += emissions.grams(energy_j, provider.at(1e9 + tick).grams_per_kwh, pue)
    expected = total_j / 3.6e6 * 437.5 * pue
    assert grams == pytest.approx(expected, rel=1e-9)
    assert provider.at(0) == intensity.Intensity(437.5, "X", "static")


def test_csv_step_charges_each_tick_at_its_own_intensity(tmp_path):
    step = 1_700_000_000.0
    series = tmp_path / "intensity.csv"
    series.write_text(
        f"timestamp,g_per_kwh\n{step - 3600:.0f},100\n2023-11-14T22:13:20Z,500\n"  # == step, written as ISO 8601
    )
    provider = intensity.CsvSeriesProvider(series, zone="own")
    assert provider.at(step - 0.001).grams_per_kwh == 100
    assert provider.at(step).grams_per_kwh == 500
    assert provider.at(step - 7200).grams_per_kwh == 100  # before the first point, the first holds

    # A job draws 200 W for 30 s before the step and 50 W for 30 s after it.
    grams = 0.0
    energy_before = energy_after = 0.0
    for tick in range(60):
        end = step - 30 + tick + 1
        energy_j = 200.0 if end <= step else 50.0
        if end <= step:
            energy_before += energy_j
        else:
            energy_after += energy_j
        grams += emissions.grams(energy_j, provider.at(emissions.interval_midpoint_s(end, 1.0)).grams_per_kwh)
    by_step = energy_before / 3.6e6 * 100 + energy_after / 3.6e6 * 500
    average = (energy_before + energy_after) / 3.6e6 * 300
    assert grams == pytest.approx(by_step, rel=1e-9)
    assert abs(grams - average) > 0.1 * average


@pytest.mark.parametrize(
    "text, message",
    [
        ("1700000000,100\nyesterday,200\n", ":2: bad timestamp 'yesterday'"),
        ("1700000000,lots\n", ":1: bad intensity 'lots'"),
        ("1700000000\n", ":1: expected timestamp,gCO2eq/kWh"),
        ("1700000000,-5\n", "outside 0..3000"),
        ("timestamp,g\n", "no data points"),
    ],
)
def test_bad_csv_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match="carbon.csv_path: .*" + message.replace(".", r"\.")):
        intensity.from_config(config.CarbonConfig(provider="csv", csv_path=path))


def test_missing_csv_is_a_config_error(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        intensity.from_config(config.CarbonConfig(provider="csv", csv_path=tmp_path / "none.csv"))


class Api:
    """An Electricity Maps compatible server on loopback whose behaviour the test sets."""

    def __init__(self):
        self.mode = "ok"
        self.value = 321.0
        self.delay_s = 0.0
        self.requests = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                api.requests.append((self.path, self.headers.get("auth-token")))
                if api.delay_s:
                    time.sleep(api.delay_s)
                if api.mode == "500":
                    body, status = b'{"error": "boom"}', 500
                elif api.mode == "malformed":
                    body, status = b'{"carbonIntensity": 12', 200
                elif api.mode == "garbage":
                    body, status = json.dumps({"carbonIntensity": "high"}).encode(), 200
                else:
                    body, status = json.dumps({"zone": "DE", "carbonIntensity": api.value}).encode(), 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up waiting

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def api():
    server = Api()
    yield server
    server.close()


def http_provider(api, **overrides):
    settings = dict(
        provider="http", url=api.url, zone="DE", token="s3cret", intensity_g_per_kwh=250.0, timeout_s=0.5, poll_s=1.0
    )
    settings.update(overrides)
    return intensity.from_config(config.CarbonConfig(**settings))


def test_http_normal_answer_is_used_and_sent_with_token(api):
    provider = http_provider(api)
    try:
        assert wait_for(lambda: provider.at(time.time()).source == "http")
        assert provider.at(time.time()) == intensity.Intensity(321.0, "DE", "http")
        assert api.requests[0] == ("/v3/carbon-intensity/latest?zone=DE", "s3cret")
        assert provider.errors_total == 0
        api.value = 90.0
        assert wait_for(lambda: provider.at(time.time()).grams_per_kwh == 90.0)
    finally:
        provider.close()


@pytest.mark.parametrize("mode", ["500", "malformed", "garbage"])
def test_http_errors_fall_back_visibly_and_recover(api, mode):
    api.mode = mode
    provider = http_provider(api)
    try:
        assert wait_for(lambda: provider.errors_total >= 2)
        now = provider.at(time.time())
        assert now == intensity.Intensity(250.0, "DE", "fallback_static")
        api.mode = "ok"
        assert wait_for(lambda: provider.at(time.time()).source == "http")
        assert provider.at(time.time()).grams_per_kwh == 321.0
    finally:
        provider.close()


def test_http_slow_answer_times_out_and_never_blocks_the_caller(api):
    api.delay_s = 5.0
    provider = http_provider(api, timeout_s=0.3, poll_s=1.0)
    try:
        assert wait_for(lambda: provider.errors_total >= 1)
        assert "timed out" in provider.last_error
        # The caller is a tick of the daemon: it is answered from memory while the server hangs.
        worst = 0.0
        for _ in range(50):
            started = time.monotonic()
            value = provider.at(time.time())
            worst = max(worst, time.monotonic() - started)
            assert value.source == "fallback_static" and value.grams_per_kwh == 250.0
        assert worst < 0.25
    finally:
        api.delay_s = 0.0
        provider.close()


def test_http_unreachable_falls_back_to_the_country_table(api):
    url = api.url
    api.close()  # nothing listens there any more
    provider = intensity.from_config(
        config.CarbonConfig(provider="http", url=url, zone="FR", country="FRA", timeout_s=0.3, poll_s=1.0)
    )
    try:
        assert wait_for(lambda: provider.errors_total >= 1)
        now = provider.at(time.time())
        assert now.source == "fallback_codecarbon" and now.zone == "FRA"
        assert now.grams_per_kwh == pytest.approx(56.039)
    finally:
        provider.close()


def test_http_stale_value_gives_way_to_the_fallback(api):
    provider = intensity.HttpProvider(
        api.url, "DE", intensity.StaticProvider(250.0), poll_s=0.2, timeout_s=0.5, max_age_s=1.0
    )
    try:
        assert wait_for(lambda: provider.at(time.time()).source == "http")
        api.mode = "500"
        assert wait_for(lambda: provider.at(time.time()).source == "fallback_static")
        assert provider.errors_total >= 1
    finally:
        provider.close()


def test_carbon_config_errors_name_the_key(tmp_path):
    cases = {
        '[carbon]\nprovider = "sun"\n': "carbon.provider: expected one of",
        '[carbon]\nprovider = "static"\n': "carbon.intensity_g_per_kwh: required",
        '[carbon]\nprovider = "http"\nurl = "ftp://x"\nzone = "DE"\n': "carbon.url: expected an http",
        '[carbon]\npue = 0.5\n': "carbon.pue: 0.5 is outside",
        '[carbon]\ncolour = "green"\n': "carbon.colour: unknown key",
        '[carbon]\nintensity_g_per_kwh = "lots"\n': "carbon.intensity_g_per_kwh: expected a number",
    }
    for text, message in cases.items():
        path = tmp_path / "jouleward.toml"
        path.write_text(text)
        with pytest.raises(config.ConfigError, match=message.replace(".", r"\.")):
            config.build(path, environ={})
    path.write_text('[carbon]\nprovider = "zone"\ncountry = "USA"\nregion = "nowhere"\n')
    with pytest.raises(config.ConfigError, match="region 'nowhere' is not a US state"):
        intensity.from_config(config.build(path, environ={}).carbon)


def test_carbon_settings_from_the_environment_merge_with_the_file(tmp_path):
    path = tmp_path / "jouleward.toml"
    path.write_text('[carbon]\nprovider = "static"\nintensity_g_per_kwh = 100.0\n')
    merged = config.build(path, environ={"JOULEWARD_CARBON_PUE": "1.3"})
    assert (merged.carbon.provider, merged.carbon.intensity_g_per_kwh, merged.carbon.pue) == ("static", 100.0, 1.3)
    env_only = config.build(
        environ={"JOULEWARD_CARBON_PROVIDER": "static", "JOULEWARD_CARBON_INTENSITY_G_PER_KWH": "42"}
    )
    assert (env_only.carbon.provider, env_only.carbon.intensity_g_per_kwh) == ("static", 42.0)
    for variable, value, message in [
        ("JOULEWARD_CARBON_PUE", "abc", "JOULEWARD_CARBON_PUE: expected a number"),
        ("JOULEWARD_CARBON_PUE", "9", "JOULEWARD_CARBON_PUE: 9.0 is outside"),
        ("JOULEWARD_CARBON_NOPE", "1", "JOULEWARD_CARBON_NOPE: unknown key"),
    ]:
        try:
            config.build(path, environ={variable: value})
        except config.ConfigError as exc:
            assert message in str(exc), str(exc)
        else:
            raise AssertionError(f"{variable}={value} was accepted")
