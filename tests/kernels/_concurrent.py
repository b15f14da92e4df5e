"""Test helper: run the programs of one interpreted Triton launch concurrently, one Python
thread each, so that kernels whose programs wait for each other (the multi-program greedy
MAP's per-step barrier) can run under the interpreter, which otherwise runs the programs one
after another. Relies on interpreter internals (Triton 3.x ``GridExecutor``, ``_patch_lang``,
``InterpreterBuilder.create_get_program_id``); :func:`available` says whether they are there.
Memory is sequentially consistent here, so this checks the protocol's logic, not the GPU memory
model.
"""
import contextlib
import inspect
import sys
import threading


def available() -> bool:
    try:
        import triton.runtime.interpreter as itp
    except Exception:
        return False
    return all(hasattr(itp, a) for a in ("GridExecutor", "_patch_lang", "interpreter_builder",
                                         "InterpreterBuilder", "TensorHandle"))


@contextlib.contextmanager
def concurrent_programs(switch_interval: float = 1e-4):
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as itp

    tls = threading.local()
    threads, errors = [], []
    orig_init = itp.GridExecutor.__init__
    orig_patch = itp._patch_lang
    orig_pid = itp.InterpreterBuilder.create_get_program_id

    def get_pid(self, axis):
        idx = getattr(tls, "idx", None) or self.grid_idx
        return itp.TensorHandle(np.array([idx[axis]], dtype=np.int32), tl.int32)

    def init(self, fn, *a, **k):
        orig_init(self, fn, *a, **k)
        real = self.fn

        def spawn(**args):
            idx = itp.interpreter_builder.grid_idx

            def run():
                tls.idx = idx
                try:
                    real(**args)
                except BaseException as e:  # re-raised in the launching thread
                    errors.append(e)
            t = threading.Thread(target=run, daemon=True)
            t.start()
            threads.append(t)
        spawn.__signature__ = inspect.signature(real)
        spawn._real = real
        self.fn = spawn

    def patch(fn):
        scope = orig_patch(getattr(fn, "_real", fn))
        restore = scope.restore

        def join_then_restore():
            for t in threads:
                t.join()
            threads.clear()
            restore()
        scope.restore = join_then_restore
        return scope

    old_interval = sys.getswitchinterval()
    itp.GridExecutor.__init__ = init
    itp._patch_lang = patch
    itp.InterpreterBuilder.create_get_program_id = get_pid
    sys.setswitchinterval(switch_interval)
    try:
        yield
        if errors:
            raise errors[0]
    finally:
        itp.GridExecutor.__init__ = orig_init
        itp._patch_lang = orig_patch
        itp.InterpreterBuilder.create_get_program_id = orig_pid
        sys.setswitchinterval(old_interval)
