"""How the pool's workers are started: as child processes of the server (`local`), or as Ray
actors on the nodes of a Ray cluster (`ray_launcher`, imported only with --ray-address)."""
