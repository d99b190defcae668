"""The batch jobs' logic: units of work and the actor pool they share (``units``), extract, distill,
score and its report, evaluate, fetch_fec."""
