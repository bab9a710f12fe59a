"""The runtime: what runs inside the stage processes (scheduler, block manager, pipeline, stage
worker, point-to-point hop, sampling, decode graphs) and how they are started (launch, worker)."""
