"""quantfleet's infra layer: storage backends (local folder, S3), publishing as a commit, and
safetensors I/O (strict headers, catalogs, ranged tensor reads, streaming writes).

May import from `quantizers`, never from `workers` or `flows`; needs neither Ray nor Prefect.
Every error it raises derives from `infra.errors.InfraError`.
"""

__all__: list[str] = []
