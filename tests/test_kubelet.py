import time

import pytest

from agent.workloads.kubelet import KubeletError, KubeletPoller, KubeletSettings, fetch_pods, parse_pod_list
from agent.workloads.mljob import job_for_pod
from tests.support.kubelet_server import FakeKubelet, pod_item

UID_A = "0f6b3c1e-1111-4a2b-9c3d-aaaaaaaaaaaa"
UID_B = "0f6b3c1e-2222-4a2b-9c3d-bbbbbbbbbbbb"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    return path


@pytest.fixture
def kubelet():
    server = FakeKubelet(
        "s3cret-token",
        [
            pod_item(
                UID_A,
                "llama-ft-worker-0",
                "research",
                {"training.kubeflow.org/job-name": "llama-ft"},
                owner=("PyTorchJob", "llama-ft"),
                container_ids=("c" * 64,),
            ),
            pod_item(UID_B, "notebook-7", "research"),
        ],
    )
    yield server
    server.stop()


def test_fetch_reads_pods_with_bearer_token(kubelet, token_file):
    pods = fetch_pods(KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file))
    assert set(pods) == {UID_A, UID_B}
    worker = pods[UID_A]
    assert (worker.name, worker.namespace, worker.node) == ("llama-ft-worker-0", "research", "node-a")
    assert (worker.owner_kind, worker.owner_name) == ("PyTorchJob", "llama-ft")
    assert worker.container_ids == ("c" * 64,)
    assert kubelet.unauthorized == 0


def test_wrong_token_is_an_error_naming_the_status(kubelet, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("nope")
    with pytest.raises(KubeletError, match="HTTP 401"):
        fetch_pods(KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=bad))
    assert kubelet.unauthorized == 1


def test_malformed_items_are_skipped_and_non_podlists_rejected():
    pods = parse_pod_list({"items": [{"metadata": {"uid": "U_1", "name": "a", "namespace": "n"}}, {"metadata": {}}, 7]})
    assert list(pods) == ["u-1"]
    with pytest.raises(KubeletError):
        parse_pod_list(["not", "a", "podlist"])


def test_kubelet_going_away_keeps_metadata_and_marks_stale(kubelet, token_file):
    settings = KubeletSettings(
        url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file, poll_s=0.05, timeout_s=1.0
    )
    poller = KubeletPoller(settings)
    poller.start()
    try:
        deadline = time.monotonic() + 10
        while not poller.health().up and time.monotonic() < deadline:
            time.sleep(0.02)
        healthy = poller.health()
        assert healthy.up and not healthy.stale and healthy.pods == 2
        assert healthy.last_success_unix_s > time.time() - 60
        kubelet.stop()
        while poller.health().up and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        down = poller.health()
        assert not down.up and down.stale
        assert down.errors_total >= 1
        assert down.last_success_unix_s == healthy.last_success_unix_s
        # The last known metadata still resolves, under either UID spelling.
        pod = poller.pod(UID_A.replace("-", "_"))
        assert pod is not None and job_for_pod(pod).job.name == "llama-ft"
        assert poller.pod_for_container("c" * 64) == pod
    finally:
        poller.stop()


def test_pods_gone_from_the_kubelet_are_kept_for_the_retention_only(kubelet, token_file):
    clock = [1000.0]
    poller = KubeletPoller(
        KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file, gone_retention_s=60.0),
        monotonic=lambda: clock[0],
    )
    assert poller.poll_once()
    kubelet.pods = kubelet.pods[:1]
    clock[0] += 30
    assert poller.poll_once()
    assert poller.pod(UID_B) is not None
    clock[0] += 59
    assert poller.poll_once()
    assert poller.pod(UID_B) is not None
    clock[0] += 2
    assert poller.poll_once()
    assert poller.pod(UID_B) is None and poller.pod(UID_A) is not None


def test_overdue_poll_counts_as_stale(kubelet, token_file):
    clock = [0.0]
    poller = KubeletPoller(
        KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file, poll_s=30, timeout_s=5),
        monotonic=lambda: clock[0],
    )
    assert poller.health().stale  # nothing known yet
    poller.poll_once()
    assert not poller.health().stale
    clock[0] = 64.0
    assert not poller.health().stale
    clock[0] = 66.0
    assert poller.health().stale and poller.health().up


def test_the_token_is_never_sent_over_plain_http(token_file):
    plain = FakeKubelet(None, [pod_item(UID_B, "notebook-7", "research")], tls=False)
    try:
        assert plain.url.startswith("http://")
        pods = fetch_pods(KubeletSettings(url=plain.url, token_file=token_file))
        assert set(pods) == {UID_B}  # a read-only port answers without one
        assert plain.authorizations == [None]
    finally:
        plain.stop()


def test_a_redirect_to_another_host_is_not_followed_with_the_token(kubelet, token_file):
    elsewhere = FakeKubelet(None, [], host="127.0.0.2")
    try:
        for target in (elsewhere.url, elsewhere.url.replace("https://", "http://")):
            kubelet.redirect_to = target
            with pytest.raises(KubeletError, match="HTTP 302, a redirect to .*not followed"):
                fetch_pods(KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file))
        assert kubelet.authorizations == ["Bearer s3cret-token"] * 2  # the kubelet itself got it
        assert elsewhere.authorizations == []  # nothing reached the other host, token or not
    finally:
        elsewhere.stop()


def test_the_controlling_owner_and_its_uid_come_from_owner_references():
    from agent.workloads.kubelet import parse_pod

    pod = parse_pod(
        {
            "metadata": {
                "uid": "p1",
                "name": "w-0",
                "namespace": "ml",
                "ownerReferences": [
                    {"kind": "Node", "name": "n1", "uid": "node-uid"},
                    {
                        "kind": "PyTorchJob",
                        "name": "ft",
                        "uid": "6f1c1a7e-0b1d-4c55-9a3e-1d2b3c4d5e6f",
                        "controller": True,
                    },
                ],
            }
        }
    )
    assert (pod.owner_kind, pod.owner_name, pod.owner_uid) == (
        "PyTorchJob",
        "ft",
        "6f1c1a7e-0b1d-4c55-9a3e-1d2b3c4d5e6f",
    )
    bare = parse_pod({"metadata": {"uid": "p2", "name": "x", "namespace": "ml"}})
    assert (bare.owner_kind, bare.owner_uid) == ("", "")
