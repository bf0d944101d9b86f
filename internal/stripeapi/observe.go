package stripeapi

import (
	"net/http"
	"strings"
	"time"
)

// ObservedTransport returns an http.RoundTripper that sends every request through base
// (http.DefaultTransport when nil) and reports it to observe: its Operation, the HTTP status of
// the answer (0 when none came) and how long it took. Put it above RateLimitedTransport, so that
// the time includes the wait for a slot, and under the Stripe client, so that every call billingd
// makes is measured, each network retry of stripe-go's on its own.
func ObservedTransport(base http.RoundTripper, observe func(operation string, status int, took time.Duration)) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return &observedTransport{base: base, observe: observe}
}

type observedTransport struct {
	base    http.RoundTripper
	observe func(string, int, time.Duration)
}

func (t *observedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	op := Operation(req.Method, req.URL.Path)
	start := time.Now()
	resp, err := t.base.RoundTrip(req)
	status := 0
	if err == nil {
		status = resp.StatusCode
	}
	t.observe(op, status, time.Since(start))
	return resp, err
}

// Operation names a Stripe API request for metrics, from its method and path, with object ids
// left out so that the names are few: POST /v1/payment_intents is create_payment_intent,
// GET /v1/payment_intents/pi_1 retrieve_payment_intent, GET /v1/payment_intents/search
// search_payment_intents, POST /v1/checkout/sessions/cs_1/expire expire_checkout_session,
// POST /v1/customers/cus_1 update_customer, DELETE delete_<object>.
func Operation(method, path string) string {
	rel, ok := strings.CutPrefix(path, "/v1/")
	if !ok || strings.Trim(rel, "/") == "" {
		return "other"
	}
	parts := strings.Split(strings.Trim(rel, "/"), "/")
	// The resource is the leading run of segments that are not ids (ids have an underscore
	// after a lowercase prefix, as in pi_..., cs_test_..., or are numbers).
	n := 0
	for n < len(parts) && !isID(parts[n]) && parts[n] != "search" {
		n++
	}
	if n == 0 {
		return "other"
	}
	resource := strings.Join(parts[:n], "_") // checkout_sessions, payment_intents
	one := strings.TrimSuffix(resource, "s")
	rest := parts[n:]
	switch {
	case len(rest) == 1 && rest[0] == "search":
		return "search_" + resource
	case len(rest) == 0 && method == http.MethodPost:
		return "create_" + one
	case len(rest) == 0:
		return "list_" + resource
	case len(rest) == 1 && method == http.MethodGet:
		return "retrieve_" + one
	case len(rest) == 1 && method == http.MethodPost:
		return "update_" + one
	case len(rest) == 1 && method == http.MethodDelete:
		return "delete_" + one
	case len(rest) == 2 && !isID(rest[1]):
		return rest[1] + "_" + one // expire_checkout_session, attach_payment_method
	}
	return "other"
}

// isID reports whether a path segment is an object id rather than a resource name.
func isID(s string) bool {
	if s == "" {
		return false
	}
	if strings.Trim(s, "0123456789") == "" {
		return true
	}
	i := strings.IndexByte(s, '_')
	return i > 0 && i < len(s)-1 && strings.ToLower(s[:i]) == s[:i] && !strings.Contains(s[:i], "-") &&
		len(s[:i]) <= 8 && strings.ContainsAny(s[i+1:], "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
}
