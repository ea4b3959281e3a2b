from agent.workloads.slurm import identity_from_environ


def test_name_and_user_come_from_a_matching_environment():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bert-pretrain", "SLURM_JOB_USER": "alice"}
    found = identity_from_environ("4242", env)
    assert (found.job_id, found.name, found.user) == ("4242", "bert-pretrain", "alice")


def test_environment_of_another_job_is_ignored():
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "other", "SLURM_JOB_USER": "bob"}
    assert identity_from_environ("4242", env) == identity_from_environ("4242", {})
    assert identity_from_environ("4242", {}).name == "4242"


def test_control_characters_are_dropped():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "a\x1b[31mb", "SLURM_JOB_USER": "carol"}
    assert identity_from_environ("7", env).name == "7"
