"""What the API answers, as Pydantic models: FastAPI serializes them and the OpenAPI schema at
`/openapi.json` (and `/docs`) describes them. `PredictionOut` is the contract's `Prediction`
(`Prediction.to_dict()`), the one schema `predict --json` writes too."""

from typing import Any

from pydantic import BaseModel, Field

from digitjax.inference.classifier import ModelInfo, Prediction, Verdict


class ModelInfoOut(BaseModel):
    """The model that answers, without any path of the host."""

    name: str = Field(description="\"bundled\", the run folder's name, or the exported file's.")
    kind: str = Field(description='"checkpoint", "onnx" or "stablehlo".')
    step: int | None
    test_accuracy: float | None = Field(description="On its dataset's test split, at that step.")
    temperature: float | None = Field(description="None: the probabilities are not calibrated.")
    dataset: str
    num_classes: int
    detects_non_digits: bool = Field(description="It has a non-digit detector.")
    calibrated: bool

    @classmethod
    def of(cls, info: ModelInfo) -> "ModelInfoOut":
        return cls(**info.to_dict())


class PredictionOut(BaseModel):
    """One image's answer; `digit` is null when the image holds no digit (`error` says why, or
    the verdict is not_a_digit)."""

    name: str | None = Field(description="The uploaded file's name; null for a raw body.")
    digit: int | None
    confidence: float | None = Field(description="The top calibrated probability.")
    uncertain: bool | None = Field(description="Not sure, or not a digit; null with an error.")
    verdict: Verdict | None = Field(description="null when there is an error.")
    probabilities: list[float] | None = Field(description="Of the digits 0 to 9.")
    non_digit_score: float | None = Field(
        description="The non-digit detector's score: positive, the image does not look like a "
        "digit (verdict not_a_digit); null with an error or a model without a detector."
    )
    error: str | None = Field(description="Why the image has no answer.")
    image: str | None = Field(
        default=None, description="With ?image=true: the 28x28 input the model saw, a PNG data URL."
    )

    @classmethod
    def of(cls, prediction: Prediction, **extra: Any) -> "PredictionOut":
        return cls(**prediction.to_dict(), **extra)


class PredictResponse(BaseModel):
    predictions: list[PredictionOut] = Field(description="One per image, in request order.")
    model: ModelInfoOut


class InfoResponse(BaseModel):
    model: ModelInfoOut
    min_confidence: float | None = Field(description="Below it an answer is not sure.")
    device: str
    backend: str
    batch_sizes: list[int] = Field(description="Compiled forward-pass batch sizes.")
    max_batch: int
    max_wait_ms: float
    workers: int = Field(description="Preprocessing processes.")
    limits: dict[str, int | float]
    ready: bool


class Status(BaseModel):
    status: str


class ErrorOut(BaseModel):
    detail: str = Field(description="One sentence.")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route's refusals."""
    return {status: {"model": ErrorOut, "description": REFUSALS[status]} for status in statuses}


REFUSALS = {
    400: "Malformed multipart, an empty file, or no file part.",
    408: "The request body arrived too slowly.",
    413: "Too large: the body, a file, the number of files, or the pixels of the images.",
    415: "Neither multipart/form-data nor an image/* body, or a compressed one (Content-Encoding).",
    422: "An invalid query parameter.",
    429: "This client's requests in progress already hold too many pixels or images; retry later.",
    503: "Still compiling, too busy, or too slow; retry after Retry-After seconds.",
}
