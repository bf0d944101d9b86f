package stripeapi_test

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
)

func TestOperation(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ method, path, want string }{
		{"POST", "/v1/payment_intents", "create_payment_intent"},
		{"GET", "/v1/payment_intents/pi_3PxYz0AbCdEf", "retrieve_payment_intent"},
		{"GET", "/v1/payment_intents/search", "search_payment_intents"},
		{"POST", "/v1/checkout/sessions", "create_checkout_session"},
		{"GET", "/v1/checkout/sessions/cs_test_a1B2c3", "retrieve_checkout_session"},
		{"POST", "/v1/checkout/sessions/cs_test_a1B2c3/expire", "expire_checkout_session"},
		{"POST", "/v1/customers", "create_customer"},
		{"POST", "/v1/customers/cus_Q1w2E3", "update_customer"},
		{"GET", "/v1/setup_intents/seti_1Abc", "retrieve_setup_intent"},
		{"POST", "/v1/payment_methods/pm_1Abc/attach", "attach_payment_method"},
		{"POST", "/v1/refunds", "create_refund"},
		{"GET", "/v1/customers", "list_customers"},
		{"DELETE", "/v1/customers/cus_Q1w2E3", "delete_customer"},
		{"GET", "/", "other"},
	} {
		require.Equal(t, tc.want, stripeapi.Operation(tc.method, tc.path), "%s %s", tc.method, tc.path)
	}
}

// TestObservedTransportSeesEveryCall sends calls through a Stripe client built on the observed
// transport: each is reported once with its operation and status, and a call that got no answer
// with status 0.
func TestObservedTransportSeesEveryCall(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/v1/customers" {
			_, _ = w.Write([]byte(`{"id": "cus_Q1w2E3", "object": "customer"}`))
			return
		}
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"error": {"type": "invalid_request_error", "message": "No such payment_intent"}}`))
	}))
	defer srv.Close()

	type call struct {
		op     string
		status int
	}
	var (
		mu    sync.Mutex
		calls []call
	)
	observe := func(op string, status int, took time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, call{op, status})
	}
	client := stripeapi.NewClient("sk_test_observe", srv.URL,
		&http.Client{Transport: stripeapi.ObservedTransport(nil, observe)}, 0)
	_, err := client.V1Customers.Create(t.Context(), stripeapi.CustomerCreate(installation, "user-1", "a@example.com"))
	require.NoError(t, err)
	_, err = client.V1PaymentIntents.Retrieve(t.Context(), "pi_3PxYz0AbCdEf", nil)
	require.Error(t, err)
	down := stripeapi.NewClient("sk_test_observe", "http://127.0.0.1:1",
		&http.Client{Transport: stripeapi.ObservedTransport(nil, observe)}, 0)
	_, err = down.V1PaymentIntents.Create(t.Context(), &stripe.PaymentIntentCreateParams{})
	require.Error(t, err)

	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []call{{"create_customer", 200}, {"retrieve_payment_intent", 404}, {"create_payment_intent", 0}}, calls)
}
