"""On-demand list prices per GPU type, each with the offer it comes from, its source and the date it
was recorded. Usage is priced per GPU-hour: the instance price over its GPU count."""

from __future__ import annotations

PRICES = {
    "h100": {"offer": "Azure ND96isr H100 v5 (8 x H100 80GB), pay as you go", "usd_per_hour": 98.32, "gpus": 8,
             "source": "https://azure.microsoft.com/pricing/details/virtual-machines/linux/", "as_of": "2026-12-02"},
    "a100-80gb": {"offer": "AWS p4de.24xlarge (8 x A100 80GB), on demand, us-east-1", "usd_per_hour": 40.96, "gpus": 8,
                  "source": "https://aws.amazon.com/ec2/instance-types/p4/", "as_of": "2026-12-02"},
    "local": {"offer": "this machine (no charge)", "usd_per_hour": 0.0, "gpus": 1, "source": None, "as_of": None},
}


def per_gpu_hour(gpu_type: str) -> float | None:
    """USD per GPU-hour, or None for a type with no recorded price (its cost shows as unknown)."""
    price = PRICES.get(gpu_type)
    return None if price is None else price["usd_per_hour"] / price["gpus"]


def table() -> list[dict]:
    return [{"gpu_type": k, "usd_per_gpu_hour": per_gpu_hour(k), **v} for k, v in sorted(PRICES.items())]
