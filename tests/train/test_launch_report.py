"""How the launcher names the cause of a failed worker group (mlc.distributed.report.root_cause)."""

import signal
from dataclasses import dataclass

from mlc.distributed.report import root_cause


@dataclass
class Failure:  # the fields of torch's ProcessFailure that root_cause reads
    exitcode: int
    pid: int
    timestamp: int


def test_a_worker_that_aborted_is_named_not_the_one_the_agent_then_stopped(tmp_path):
    failures = {0: Failure(-signal.SIGTERM, 100, 5), 1: Failure(-signal.SIGABRT, 101, 5)}
    assert root_cause(tmp_path, failures) == ("worker rank 1 (pid 101) was killed by SIGABRT", 128 + signal.SIGABRT)


def test_an_exit_code_outranks_the_agents_sigterm_and_the_earliest_failure_comes_first(tmp_path):
    failures = {0: Failure(-signal.SIGTERM, 100, 4), 1: Failure(3, 101, 6), 2: Failure(-signal.SIGKILL, 102, 5)}
    assert root_cause(tmp_path, failures) == ("worker rank 2 (pid 102) was killed by SIGKILL", 128 + signal.SIGKILL)


def test_sigterm_alone_is_the_cause(tmp_path):
    failures = {1: Failure(-signal.SIGTERM, 101, 5)}
    assert root_cause(tmp_path, failures) == ("worker rank 1 (pid 101) was killed by SIGTERM", 128 + signal.SIGTERM)


def test_leaving_the_group_first_frees_the_garbage_that_holds_it(tmp_path):
    """A finished FSDP2 model is cyclic garbage holding the process group: shutdown frees it before destroying the
    group, while the interpreter is alive (left to teardown, gloo's threads aborted the worker)."""
    import gc
    import weakref

    import torch.distributed as dist

    from mlc.distributed import dist as mdist

    class Holder:  # stands in for a sharded module: part of a reference cycle, holding the group
        pass

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    gc.disable()  # nothing but shutdown may collect the cycle
    try:
        holder = Holder()
        holder.cycle, holder.group = holder, dist.group.WORLD
        alive = weakref.ref(holder)
        del holder
        assert alive() is not None
        mdist.shutdown()
        assert alive() is None and not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
