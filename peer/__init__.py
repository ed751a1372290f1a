"""The corolla peer: serves a span of transformer blocks to the swarm."""

import os

# A peer is one stage of a pipeline that shares the cores with the other stages and with clients: OpenMP
# threads that spin after each forward take the core the next stage needs (on 2 cores, 3 peers and a
# client: about 4x slower decode when the machine is busy). Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
