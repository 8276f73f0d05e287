from tests.e2e.network.conftest import net_env, net_vm, workspace  # noqa: F401  (fixtures)
