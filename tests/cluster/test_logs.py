"""A reused Ray worker's log, cut down to this job's lines (forgetting_ray.cluster.logs)."""

from __future__ import annotations

from forgetting_ray.cluster.logs import own_job_lines


def test_own_job_lines_keeps_this_jobs_sections_of_a_reused_workers_log():
    text = (":job_id:01000000\n:task_name:other\nnot ours\n"
            ":job_id:02000000\n:actor_name:ScoreActor\nloading the model\nWarning: slow\n"
            ":job_id:01000000\n:task_name:other\nstill not ours\n"
            ":job_id:02000000\n:task_name:later\ndone\n")
    assert own_job_lines(text, "02000000") == ("ScoreActor", "loading the model\nWarning: slow\ndone\n")
    assert own_job_lines(text, "03000000") == (None, "")
