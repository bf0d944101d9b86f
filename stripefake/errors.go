package stripefake

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

// Stripe's error types, as sent in error.type.
const (
	errTypeAPI            = "api_error"
	errTypeCard           = "card_error"
	errTypeIdempotency    = "idempotency_error"
	errTypeInvalidRequest = "invalid_request_error"
)

// apiError is Stripe's error object; status is the HTTP status it is sent with.
type apiError struct {
	status int

	Charge        string `json:"charge,omitempty"`
	Code          string `json:"code,omitempty"`
	DeclineCode   string `json:"decline_code,omitempty"`
	DocURL        string `json:"doc_url,omitempty"`
	Message       string `json:"message"`
	Param         string `json:"param,omitempty"`
	PaymentIntent any    `json:"payment_intent,omitempty"`
	PaymentMethod any    `json:"payment_method,omitempty"`
	SetupIntent   any    `json:"setup_intent,omitempty"`
	Type          string `json:"type"`
}

// withoutIntents returns a copy without the embedded intents, as Stripe
// renders last_payment_error and last_setup_error.
func (e *apiError) withoutIntents() *apiError {
	if e == nil {
		return nil
	}
	c := *e
	c.PaymentIntent = nil
	c.SetupIntent = nil
	return &c
}

func docURL(code string) string {
	if code == "" {
		return ""
	}
	return "https://stripe.com/docs/error-codes/" + strings.ReplaceAll(code, "_", "-")
}

func invalidRequest(status int, param, code, format string, args ...any) *apiError {
	return &apiError{
		status:  status,
		Type:    errTypeInvalidRequest,
		Code:    code,
		DocURL:  docURL(code),
		Param:   param,
		Message: fmt.Sprintf(format, args...),
	}
}

// badParam is a 400 invalid_request_error about one parameter.
func badParam(param, code, format string, args ...any) *apiError {
	return invalidRequest(http.StatusBadRequest, param, code, format, args...)
}

func unknownParam(param string) *apiError {
	return badParam(param, "parameter_unknown", "Received unknown parameter: %s", param)
}

func missingParam(param string) *apiError {
	return badParam(param, "parameter_missing", "Missing required param: %s.", param)
}

// noSuch is Stripe's answer for an id that does not exist. Stripe answers 404
// when the id is in the path and 400 when it is a body parameter.
func noSuch(status int, param, what, id string) *apiError {
	return invalidRequest(status, param, "resource_missing", "No such %s: '%s'", what, id)
}

func internalError() *apiError {
	return &apiError{
		status:  http.StatusInternalServerError,
		Type:    errTypeAPI,
		Message: "An unknown error occurred (stripefake injected fault).",
	}
}

// response is an encoded API answer, as stored under an idempotency key.
type response struct {
	status int
	body   []byte
	// shouldRetry is the Stripe-Should-Retry header value; empty sends none.
	shouldRetry string
}

func errorResponse(e *apiError) *response {
	body, err := json.Marshal(struct {
		Error *apiError `json:"error"`
	}{e})
	if err != nil {
		panic(fmt.Sprintf("stripefake: encode error: %v", err))
	}
	return &response{status: e.status, body: body}
}

func jsonResponse(v any) *response {
	body, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("stripefake: encode response: %v", err))
	}
	return &response{status: http.StatusOK, body: body}
}

func (r *response) write(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	if r.shouldRetry != "" {
		h.Set("Stripe-Should-Retry", r.shouldRetry)
	}
	w.WriteHeader(r.status)
	_, _ = w.Write(r.body)
}
