"""Hosts on a private network, for tests: each host a process holding new network, UTS, mount and PID namespaces,
all of them joined by a bridge, and all of it gone when the hosts stop.

Every host (`unshare`, started through `setpriv --pdeathsig KILL` with `--kill-child`, so that it dies with the
test process even when that is killed) has its own hostname, its own /proc, a hosts file naming every host
bind-mounted on /etc/hosts inside its mount namespace only, and an eth0 with its address. The first host's network
namespace also holds the bridge, with one end of a veth pair per host on it. No address, interface, mount or file
outside the hosts' folder is made, and their traffic stays inside their namespaces; as nothing is shared but the
file system, hosts of other test processes can run at the same time with the same addresses.

`forward_port` carries connections to a port on a host's loopback to the same port on this machine's loopback
(a local server the hosts' processes must reach, as a training container reaches S3).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

CLONE_NEWNET = 0x40000000


class HostsError(RuntimeError):
    """The hosts could not start, or a command in one of them failed."""


def which(tool: str) -> str | None:
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin:/sbin:/bin")


def sbin(tool: str) -> str:
    found = which(tool)
    if not found:
        raise HostsError(f"no {tool} on this machine")
    return found


def missing() -> str | None:
    """Why this machine cannot make hosts, in words; None when it can."""
    if os.geteuid() != 0:
        return "not root (the hosts need namespaces and a bridge)"
    tools = [tool for tool in ("unshare", "nsenter", "setpriv", "ip") if not which(tool)]
    if tools:
        return f"no {', '.join(tools)} (util-linux, iproute2)"
    probe = subprocess.run([sbin("unshare"), "--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "sh",
                            "-c", "ip link add probe0 type bridge && ip link add probe1 type veth peer name probe2"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode:
        return f"no namespaces, bridges or veth pairs here: {probe.stderr.strip() or probe.returncode}"
    return None


class StartedInWith:
    """`with it:` start() on entering, stop() on leaving."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Hosts(StartedInWith):
    """`with Hosts(folder, {"algo-1": "10.232.0.1", ...}) as hosts:` the hosts, up and connected. `setup` holds
    shell lines per host, run as root in its namespaces before anything else (mounts of its own, say)."""

    def __init__(self, folder: Path, addresses: dict[str, str], setup: dict[str, str] | None = None,
                 start_timeout: float = 30):
        self.folder = Path(folder)
        self.addresses = dict(addresses)
        self.setup = setup or {}
        self.start_timeout = start_timeout
        self.hosts_file = self.folder / "hosts"
        self.holders: dict[str, subprocess.Popen] = {}  # host: its `unshare`
        self.pids: dict[str, int] = {}  # host: the first process of its namespaces, as this machine numbers it
        self.listeners: list[socket.socket] = []

    @property
    def first(self) -> str:
        return next(iter(self.addresses))

    def start(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.hosts_file.write_text("127.0.0.1 localhost\n"
                                       + "".join(f"{address} {host}\n" for host, address in self.addresses.items()))
            for host in self.addresses:  # all at once: unshare, mount and hostname take a few ms each
                self.holders[host] = self.hold_namespaces(host)
            for host, holder in self.holders.items():
                self.pids[host] = self.first_process(host, holder)
            self.connect()
        except BaseException:
            self.stop()
            raise

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not condition():
            if time.monotonic() > deadline:
                raise HostsError(f"waiting for {what}: not after {self.start_timeout} s")
            time.sleep(0.05)

    def log(self, host: str) -> Path:
        return self.folder / f"{host}-namespaces.log"

    def hold_namespaces(self, host: str) -> subprocess.Popen:
        """A process in new namespaces named `host`, which dies with this process (pdeathsig) and takes everything
        in its namespaces with it (it is their PID 1)."""
        setup = f"hostname {host} && mount --bind {self.hosts_file} /etc/hosts"
        if host in self.setup:
            setup += f" && {self.setup[host]}"
        setup += " && exec sleep infinity"
        with open(self.log(host), "w") as log:
            return subprocess.Popen([sbin("setpriv"), "--pdeathsig", "KILL", sbin("unshare"), "--net", "--uts",
                                     "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation",
                                     "slave", "sh", "-c", setup],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)

    def first_process(self, host: str, holder: subprocess.Popen) -> int:
        """The PID of the process that holds `host`'s namespaces, once it is ready (it has become `sleep`)."""
        children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children")

        def ready() -> bool:
            if holder.poll() is not None:
                raise HostsError(f"unshare for {host} exited with {holder.returncode}: "
                                 + self.log(host).read_text().strip())
            try:
                pids = children.read_text().split()
                return bool(pids) and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "sleep"
            except OSError:  # not there yet, or gone (then unshare exits, and the next look says so)
                return False

        self.wait_for(ready, f"{host}'s namespaces")
        return int(children.read_text().split()[0])

    def nsenter(self, host: str, *only: str) -> list[str]:
        """The command line prefix that runs a command in `host`'s namespaces (all of them, or `only` these): in the
        hosts' folder when it enters the mount namespace, else in the caller's working directory."""
        spaces = only or ("--net", "--uts", "--mount", "--pid")
        folder = [f"--wd={self.folder}"] if "--mount" in spaces else []
        return [sbin("nsenter"), "--target", str(self.pids[host]), *spaces, *folder, "--"]

    def connect(self) -> None:
        """The bridge in the first host's network namespace, a veth pair from it to every host's eth0."""
        script = ["ip link set lo up && ip link add br0 type bridge && ip link set br0 up"]
        for index, host in enumerate(self.addresses):
            peer = "" if host == self.first else f" netns {self.pids[host]}"
            script.append(f"ip link add port{index} type veth peer name eth0{peer} && ip link set port{index} master "
                          "br0 up")
        self.shell(self.first, " && ".join(script))
        for host, address in self.addresses.items():
            self.shell(host, f"ip link set lo up && ip addr add {address}/24 dev eth0 && ip link set eth0 up")

    def shell(self, host: str, script: str) -> None:
        done = subprocess.run([*self.nsenter(host, "--net"), "sh", "-ec", script], capture_output=True, text=True,
                              timeout=30)
        if done.returncode:
            raise HostsError(f"{script!r} in {host}'s network namespace: {done.stderr.strip()}")

    def forward_port(self, host: str, port: int) -> None:
        """Connections to 127.0.0.1:`port` in `host` reach 127.0.0.1:`port` of this machine, until the hosts stop."""
        made: list[socket.socket] = []

        def listen_in_host() -> None:  # a thread of its own: setns moves only the calling thread
            with open(f"/proc/{self.pids[host]}/ns/net") as namespace:
                if ctypes.CDLL(None, use_errno=True).setns(namespace.fileno(), CLONE_NEWNET):
                    raise HostsError(f"setns into {host}: {os.strerror(ctypes.get_errno())}")
            made.append(socket.create_server(("127.0.0.1", port)))

        thread = threading.Thread(target=listen_in_host)
        thread.start()
        thread.join()
        if not made:
            raise HostsError(f"could not listen on port {port} in {host}")
        listener = made[0]
        self.listeners.append(listener)
        threading.Thread(target=self._accept, args=(listener, port), daemon=True).start()

    @staticmethod
    def _accept(listener: socket.socket, port: int) -> None:
        while True:
            try:
                inside, _ = listener.accept()
            except OSError:  # closed: the hosts have stopped
                return
            threading.Thread(target=_relay, args=(inside, port), daemon=True).start()

    def stop(self) -> None:
        """Kill every process of the hosts (the first process of a PID namespace takes all the others with it),
        which ends their namespaces, and with them the bridge, the veth pairs and the mounts."""
        for listener in self.listeners:
            listener.close()
        for host, pid in self.pids.items():
            if self.holders[host].poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for holder in self.holders.values():
            if holder.poll() is None:
                holder.kill()  # an unshare whose first process never came
            holder.wait(timeout=30)


def _relay(inside: socket.socket, port: int) -> None:
    """Carry one connection both ways between a host and this machine's port, until both sides have closed."""
    with inside, socket.create_connection(("127.0.0.1", port)) as outside:
        back = threading.Thread(target=_pump, args=(outside, inside), daemon=True)
        back.start()
        _pump(inside, outside)
        back.join()


def _pump(source: socket.socket, target: socket.socket) -> None:
    """Copy bytes one way until the source closes (or either side fails), then close the target's way."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)
