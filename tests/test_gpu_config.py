import pytest

from agent.config import ConfigError, build


def test_gpu_keys_from_file_environment_and_cuda_visible_devices(tmp_path):
    path = tmp_path / "jouleward.toml"
    path.write_text('gpu_enabled = false\ngpu_idle_power_w = 55\ngpu_power_sample_interval_s = 0.05\n')
    config = build(path, environ={"CUDA_VISIBLE_DEVICES": "1,GPU-ab"})
    assert (config.gpu_enabled, config.gpu_idle_power_w, config.gpu_power_sample_interval_s) == (False, 55.0, 0.05)
    assert config.gpu_visible_devices == "1,GPU-ab"
    assert build(environ={"CUDA_VISIBLE_DEVICES": "1", "JOULEWARD_GPU_VISIBLE_DEVICES": "0"}).gpu_visible_devices == "0"
    assert build(environ={"CUDA_VISIBLE_DEVICES": ""}).gpu_visible_devices == ""
    assert build(environ={}).gpu_visible_devices is None
    assert build(environ={"JOULEWARD_GPU_ENABLED": "on"}).gpu_enabled is True


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"JOULEWARD_GPU_ENABLED": "maybe"}, "JOULEWARD_GPU_ENABLED: expected true or false"),
        ({"JOULEWARD_GPU_POWER_SAMPLE_INTERVAL_S": "0"}, "JOULEWARD_GPU_POWER_SAMPLE_INTERVAL_S: 0.0 is outside"),
        ({"JOULEWARD_GPU_IDLE_POWER_W": "-3"}, "JOULEWARD_GPU_IDLE_POWER_W: -3.0 is outside"),
        ({"JOULEWARD_POD_RESOURCES_ENABLED": "sometimes"}, "JOULEWARD_POD_RESOURCES_ENABLED: expected true or false"),
        ({"JOULEWARD_POD_RESOURCES_POLL_S": "0"}, "JOULEWARD_POD_RESOURCES_POLL_S: 0.0 is outside"),
        ({"JOULEWARD_SLURM_GPU_JOB_MAP_DIR": ""}, "JOULEWARD_SLURM_GPU_JOB_MAP_DIR: expected a path"),
        ({"JOULEWARD_DCGM_EXPORTER_URL": "unix:///run/dcgm.sock"}, "JOULEWARD_DCGM_EXPORTER_URL: expected an http"),
    ],
)
def test_bad_gpu_values_name_the_key(environ, message):
    with pytest.raises(ConfigError, match=message):
        build(environ=environ)


def test_gpu_allocation_keys_from_file_and_environment(tmp_path):
    socket = tmp_path / "kubelet.sock"
    path = tmp_path / "jouleward.toml"
    path.write_text(
        f'pod_resources_socket = "{socket}"\npod_resources_poll_s = 3\nslurm_gpu_job_map_dir = "/run/dcgm-job-map"\n'
        'dcgm_exporter_url = "http://127.0.0.1:9400/metrics"\n'
    )
    config = build(path, environ={"JOULEWARD_SLURM_GPU_JOB_MAP_POLL_S": "2.5"})
    assert (config.pod_resources_socket, config.pod_resources_poll_s) == (socket, 3.0)
    assert (str(config.slurm_gpu_job_map_dir), config.slurm_gpu_job_map_poll_s) == ("/run/dcgm-job-map", 2.5)
    assert config.dcgm_exporter_url == "http://127.0.0.1:9400/metrics"
    # Detected from the socket unless forced: no socket here, so off; on once forced.
    assert config.pod_resources_active is False
    assert build(path, environ={"JOULEWARD_POD_RESOURCES_ENABLED": "true"}).pod_resources_active is True
    assert build(environ={}).slurm_gpu_job_map_dir is None
