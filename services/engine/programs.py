"""AOT-compiled programs, one per (name, input shapes): the unit a stage runs and times.

    programs = Programs(precision, mesh)
    run, compile_seconds = programs.get("decode", fn, params, latents, batched=(1,))
    images = run(params, latents)

The one seam every device program passes through: a stage never calls `jax.jit` itself, so
sharding (the mesh's in/out shardings) and multi-process lockstep (`distributed.Leader`) are
decided here once.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax

from sdmesh.services.engine import sharding

MAX_PROGRAMS = 64  # compiled programs a stage keeps: its warm-up shapes and buckets, and room for more


class Lockstep(Protocol):
    """What process 0 of a multi-process stage does before each compile and call (`distributed.Leader`)."""

    def compile(self, name: str, fn: Callable, batched: tuple[int, ...], args: Sequence[Any]) -> None: ...

    def call(
        self, name: str, fn: Callable, batched: tuple[int, ...], run: Callable, params: Any, *args: Any
    ) -> Any: ...


class Programs:
    """AOT-compiled programs, one per (name, input shapes): the unit a stage runs and times.

    Given a mesh, each program is one SPMD program over it: the params keep the shardings they
    were placed with, the `batched` arguments are split by batch on `data`, the rest replicated,
    and every output is split by batch.
    """

    def __init__(self, precision: str, mesh: jax.sharding.Mesh | None = None, max_programs: int = MAX_PROGRAMS):
        """max_programs: the most compiled programs kept; past it the least recently used is dropped (and compiled
        again if asked for), so requests of ever new sizes cannot grow a stage's memory without bound."""
        self.precision, self.mesh, self.max_programs = precision, mesh, max_programs
        self._compiled: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.lockstep: Lockstep | None = None

    def lead(self, lockstep: Lockstep) -> None:
        """On a mesh over several processes, process 0 sends each compile and call to the others first
        (`distributed.Leader`): an SPMD program runs only when every process runs it."""
        self.lockstep = lockstep

    def get(self, name: str, fn: Callable, *args: Any, batched: tuple[int, ...] = ()) -> tuple[Callable, float]:
        """(compiled `fn` for these shapes, seconds spent compiling it now: 0 when it was already compiled)."""
        # args[0] is the params, fixed for the stage's life: the other inputs' shapes are the key
        rest = args[1:]
        key = (name, jax.tree_util.tree_structure(rest)) + tuple(
            (a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(rest)
        )
        compile_s = 0.0
        if key not in self._compiled:
            t0 = time.perf_counter()
            shardings = None if self.mesh is None else self._shardings(fn, args, batched)
            if self.lockstep is not None:  # the other processes compile it meanwhile
                self.lockstep.compile(name, fn, batched, args)
            with jax.default_matmul_precision(self.precision):  # read while tracing
                if shardings is None:
                    lowered = jax.jit(fn).lower(*args)
                else:
                    in_shardings, out_shardings = shardings
                    if self.mesh.is_multi_process:  # see services/distributed.py
                        from sdmesh.services.engine import distributed

                        # no process holds the others' inputs, and process 0 needs every output whole
                        out_shardings, placed = sharding.replicated(self.mesh), distributed.abstract(args, in_shardings)
                    else:
                        placed = jax.device_put(args, in_shardings)
                    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)
                    lowered = jitted.lower(*placed)
                self._compiled[key] = (lowered.compile(), shardings)
            compile_s = time.perf_counter() - t0
            while len(self._compiled) > self.max_programs:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        program, shardings = self._compiled[key]
        if shardings is None:
            return program, compile_s
        if self.mesh.is_multi_process:
            from sdmesh.services.engine import distributed

            return distributed.program_call(program, shardings[0], self.lockstep, name, fn, batched), compile_s
        # inputs arrive on one device or split another way (another stage's output):
        # move them onto the program's shardings
        return lambda *a: program(*jax.device_put(a, shardings[0])), compile_s

    def _shardings(self, fn: Callable, args: tuple, batched: tuple[int, ...]) -> tuple[tuple, Any]:
        """(in_shardings, out_shardings) on the mesh."""
        mesh = self.mesh
        params = jax.tree_util.tree_map(lambda a: a.sharding, args[0])
        rest = tuple(
            jax.tree_util.tree_map(
                lambda a, i=i: sharding.batch_sharding(mesh, a.shape) if i in batched else sharding.replicated(mesh),
                arg,
            )
            for i, arg in enumerate(args[1:], start=1)
        )
        # every output is split by batch (the stages return per-sample arrays only)
        out = jax.eval_shape(fn, *args)
        return (params, *rest), jax.tree_util.tree_map(lambda a: sharding.batch_sharding(mesh, a.shape), out)

    @property
    def shapes(self) -> list[tuple]:
        return list(self._compiled)
