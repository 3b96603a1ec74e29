"""The paper's experiment matrix: a recipe per run of Tables 1-4 (configs/paper/), a Slurm chain per run
(upcycle -> train -> export -> eval and routing analysis) that resumes where it stopped, and the tables
assembled beside the paper's numbers.

Entry points: tools/paper_matrix.py and tools/paper_tables.py. Never imports megatron-core: it runs the
stages as Slurm jobs and reads their outputs.
"""
