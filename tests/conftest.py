"""Shared test settings.

The models in these tests are tiny, so a second torch thread buys nothing; worse, when other processes share
the cores, idle-spinning OpenMP threads can slow every matmul down tenfold. One thread keeps the suite's time
predictable on any machine.
"""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def refused(capsys):
    """refused(*argv): run posttrain's main on argv, assert exit code 2 with one line on stderr, return it."""
    import posttrain

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            posttrain.main(list(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        return err

    return run
