package stripefake_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"
	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

const testKey = "sk_test_stripefake"

// bundle is one emulator behind an httptest server and a stripe-go client.
type bundle struct {
	fake *stripefake.Server
	srv  *httptest.Server
	sc   *stripe.Client
}

func setup(t *testing.T, opts ...stripefake.Option) *bundle {
	t.Helper()
	fake := stripefake.New(opts...)
	t.Cleanup(fake.Close)
	srv := httptest.NewServer(fake)
	t.Cleanup(srv.Close)
	return &bundle{fake: fake, srv: srv, sc: stripeapi.NewClient(testKey, srv.URL, srv.Client(), 0)}
}

// customer creates a customer and returns its id.
func (b *bundle) customer(t *testing.T) string {
	t.Helper()
	c, err := b.sc.V1Customers.Create(t.Context(), &stripe.CustomerCreateParams{Email: stripe.String("ada@example.com")})
	require.NoError(t, err)
	return c.ID
}

// charge makes an off-session PaymentIntent the way billingd does.
func (b *bundle) charge(t *testing.T, cus, pm string, amount int64, chargeID, key string) (*stripe.PaymentIntent, error) {
	t.Helper()
	return b.sc.V1PaymentIntents.Create(t.Context(), stripeapi.OffSessionPaymentIntent(cus, pm, amount, "usd",
		"test charge", map[string]string{"charge_id": chargeID}, key))
}

// stripeErr requires err to be a *stripe.Error and returns it.
func stripeErr(t *testing.T, err error) *stripe.Error {
	t.Helper()
	var se *stripe.Error
	require.ErrorAs(t, err, &se)
	return se
}

// receiver is a webhook endpoint that verifies signatures with stripe-go.
type receiver struct {
	srv    *httptest.Server
	secret string

	mu       sync.Mutex
	events   []stripe.Event
	bad      []error
	failNext int // answer this many requests with 500
	requests int
}

func newReceiver(t *testing.T, secret string) *receiver {
	t.Helper()
	rc := &receiver{secret: secret}
	rc.srv = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.srv.Close)
	return rc
}

func (rc *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.requests++
	ev, err := webhook.ConstructEvent(body, r.Header.Get("Stripe-Signature"), rc.secret)
	if err != nil {
		rc.bad = append(rc.bad, err)
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	if rc.failNext > 0 {
		rc.failNext--
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	rc.events = append(rc.events, ev)
	w.WriteHeader(http.StatusOK)
}

func (rc *receiver) received() []stripe.Event {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]stripe.Event(nil), rc.events...)
}

func (rc *receiver) types() []string {
	var out []string
	for _, ev := range rc.received() {
		out = append(out, string(ev.Type))
	}
	return out
}

func waitDeliveries(t *testing.T, fake *stripefake.Server) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	require.NoError(t, fake.WaitForDeliveries(ctx))
}

// eventually polls cond until it holds or a few seconds pass.
func eventually(t *testing.T, cond func() bool, msg string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(errors.New("timed out: " + msg))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func eventTypes(evs []stripefake.Event) []string {
	var out []string
	for _, ev := range evs {
		out = append(out, ev.Type)
	}
	return out
}
