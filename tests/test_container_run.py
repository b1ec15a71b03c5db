"""``llmneo run --runner containers`` shows all of a step's output, however the engine streams it."""

from llmneo_pipelines import container_run


class ExitedEarlyContainer:
    """A container whose followed log stream ends before its last output was read, as podman's
    Docker-compatible API can do for a container that exits right after writing (docker-py
    docker/models/containers.py Container.logs: ``stream=True, follow=True`` yields what the engine
    sends until it closes the response; ``stream=False`` returns the whole log as bytes)."""

    full = b"step starts\nstep exits with 3\n"

    def __init__(self):
        self.removed = False

    def logs(self, stream=False, follow=None):
        if stream:
            return iter([b"step starts\n"])  # the stream ended early: "step exits with 3" not sent
        return self.full

    def wait(self):
        return {"StatusCode": 3}

    def remove(self, v=False, force=False):
        self.removed = True


class Client:
    def __init__(self, container):
        self.containers = self
        self.container = container

    def run(self, **kwargs):
        assert kwargs["auto_remove"] is False and kwargs["detach"] is True
        return self.container


def test_a_step_s_last_output_is_shown_when_the_log_stream_ends_early(capsys):
    container = ExitedEarlyContainer()
    assert container_run.run_container(Client(container), "image", ["cmd"], {}) == 3
    assert capsys.readouterr().out == "step starts\nstep exits with 3\n"  # each line once, in order
    assert container.removed


def test_a_complete_stream_is_not_shown_twice(capsys):
    container = ExitedEarlyContainer()
    container.logs = lambda stream=False, follow=None: iter([container.full[:5], container.full[5:]]) if stream \
        else container.full
    assert container_run.run_container(Client(container), "image", ["cmd"], {}) == 3
    assert capsys.readouterr().out == container.full.decode()
