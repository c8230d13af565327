"""Opening shards and shard indexes wherever they live.

- a local path: opened as a file;
- `http://` / `https://`: streamed by `curl -f` (an HTTP error such as 404 fails it; a refused
  connection or a 408/429/5xx answer is retried 3 times, 2 s apart, then fails);
- `s3://bucket/key`: streamed by the AWS CLI, `aws s3 cp s3://bucket/key -`, so the user's AWS
  profile, credentials, region and `AWS_ENDPOINT_URL` (S3-compatible stores) apply as for any
  `aws` command; the CLI on PATH, else the one installed beside this Python (`pip install awscli`);
- `pipe:<shell command>`: the command's standard output (webdataset's convention).

A streamed source is never cut short in silence: when its stream ends, the command's exit status
is checked, and a failure (no such URL, bucket or key, missing credentials, a connection dropped
mid-shard) raises `RemoteReadError` naming the URL with the command's own last error line.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from colld_ds.errors import DataError

CURL_ARGS = ("curl", "-f", "-sS", "-L", "--connect-timeout", "30", "--retry", "3",
             "--retry-delay", "2")


class RemoteReadError(DataError):
    """A shard or index could not be read; `message` names its URL and the cause."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def is_remote(url: str) -> bool:
    """Whether `url` is streamed by a command or over a network (`pipe:...`, `scheme://...`)."""
    return url.startswith("pipe:") or "://" in url


def aws_cli() -> str:
    """The `aws` executable: on PATH, else beside this Python (a venv's `pip install awscli`).
    RemoteReadError with the fix when there is none."""
    found = shutil.which("aws") or shutil.which("aws", path=os.path.dirname(sys.executable))
    if found is None:
        raise RemoteReadError(
            "s3:// shards are streamed with the AWS CLI (`aws s3 cp URL -`), which is not "
            "installed: `pip install awscli` in colld's environment, or install AWS CLI v2")
    return found


def stream_command(url: str) -> list[str] | str:
    """The command that writes `url` to its standard output (a shell string for `pipe:`)."""
    if url.startswith("pipe:"):
        return url[len("pipe:"):]
    if url.startswith("s3://"):
        return [aws_cli(), "s3", "cp", "--only-show-errors", url, "-"]
    if url.startswith(("http://", "https://")):
        return [*CURL_ARGS, url]
    raise RemoteReadError(f"cannot read {url}: colld streams http(s)://, s3:// and pipe: URLs "
                          "only (copy it to one of those, or write pipe:<command>)")


class _CommandStream(io.RawIOBase):
    """The standard output of a command; its exit status is checked where the output ends."""

    def __init__(self, url: str, command: list[str] | str):
        self.url = url
        self._errors = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._errors,
                                      shell=isinstance(command, str))

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._proc.stdout.readinto(buffer)
        if not count:
            self._check()
        return count

    def _check(self) -> None:
        status = self._proc.wait()
        if status != 0:
            self._errors.seek(0)
            lines = self._errors.read().decode(errors="replace").strip().splitlines()
            said = f": {lines[-1].strip()}" if lines else ""
            program = os.path.basename(self._proc.args[0]) if isinstance(self._proc.args, list) \
                else "the pipe: command"
            raise RemoteReadError(f"cannot read {self.url}: {program} failed with exit status "
                                  f"{status}{said}")

    def close(self) -> None:
        """Stop the command if its output was not read to the end (that is no error)."""
        if not self.closed:
            self._proc.stdout.close()
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._errors.close()
        super().close()


def open_stream(url: str) -> io.BufferedIOBase:
    """A binary stream of `url` (module docstring). RemoteReadError naming it when the stream
    cannot be started or its command fails; FileNotFoundError for a missing local file."""
    if not is_remote(url):
        return open(url, "rb")
    command = stream_command(url)
    try:
        return io.BufferedReader(_CommandStream(url, command), buffer_size=1 << 16)
    except OSError as exc:
        shown = command if isinstance(command, str) else shlex.join(command)
        raise RemoteReadError(f"cannot read {url}: cannot start `{shown}`: {exc}") from exc
