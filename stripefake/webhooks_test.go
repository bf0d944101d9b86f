package stripefake_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

const whsec = "whsec_test_secret"

// completedSetup runs a setup-mode Checkout Session to completion and
// returns the session id.
func completedSetup(t *testing.T, b *bundle) string {
	t.Helper()
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), stripeapi.SetupSession(cus, "usd",
		"https://app.example/ok", "https://app.example/no", map[string]string{"setup_id": "s1"}, ""))
	require.NoError(t, err)
	require.NoError(t, b.fake.CompleteCheckoutSession(t.Context(), cs.ID, "pm_card_visa"))
	return cs.ID
}

func TestWebhookSignedAndVerified(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec))
	csID := completedSetup(t, b)
	waitDeliveries(t, b.fake)

	want := []string{"customer.created", "payment_method.attached", "setup_intent.succeeded", "checkout.session.completed"}
	require.ElementsMatch(t, want, rc.types())
	require.Equal(t, want, eventTypes(b.fake.Events()), "events are stored in the order they happened")
	require.ElementsMatch(t, want, eventTypes(b.fake.DeliveredEvents()))
	for _, ev := range rc.received() {
		require.Equal(t, stripe.APIVersion, ev.APIVersion)
		require.Equal(t, "event", ev.Object)
		if ev.Type != stripe.EventTypeCheckoutSessionCompleted {
			continue
		}
		var cs stripe.CheckoutSession
		require.NoError(t, json.Unmarshal(ev.Data.Raw, &cs))
		require.Equal(t, csID, cs.ID)
		require.Equal(t, stripe.CheckoutSessionStatusComplete, cs.Status)
		require.Equal(t, "s1", cs.Metadata["setup_id"])
		require.NotNil(t, cs.SetupIntent)

		got, err := b.sc.V1Events.Retrieve(t.Context(), ev.ID, nil)
		require.NoError(t, err)
		require.Equal(t, ev.Type, got.Type)
		require.Equal(t, ev.ID, got.ID)
	}
}

func TestWebhookWrongSecretFailsVerification(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, "whsec_someone_else"),
		stripefake.WithDelivery(stripefake.DeliveryOptions{MaxAttempts: 1}))
	b.customer(t)
	waitDeliveries(t, b.fake)
	require.Empty(t, rc.received())
	rc.mu.Lock()
	defer rc.mu.Unlock()
	require.Len(t, rc.bad, 1)
}

func TestWebhookRetries(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	rc.failNext = 2
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec), stripefake.WithWebhookEvents("customer.created"),
		stripefake.WithDelivery(stripefake.DeliveryOptions{Backoff: 10 * time.Millisecond}))
	b.customer(t)
	waitDeliveries(t, b.fake)

	require.Equal(t, []string{"customer.created"}, rc.types())
	var attempts []int
	var oks []bool
	for _, d := range b.fake.Deliveries() {
		attempts = append(attempts, d.Attempt)
		oks = append(oks, d.OK)
	}
	require.Equal(t, []int{1, 2, 3}, attempts)
	require.Equal(t, []bool{false, false, true}, oks)
	require.Equal(t, 500, b.fake.Deliveries()[0].StatusCode)
	require.Len(t, b.fake.DeliveredEvents(), 1)
}

func TestWebhookGivesUp(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	rc.failNext = 1000
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec), stripefake.WithWebhookEvents("customer.created"),
		stripefake.WithDelivery(stripefake.DeliveryOptions{MaxAttempts: 3, Backoff: time.Millisecond}))
	b.customer(t)
	waitDeliveries(t, b.fake)
	require.Len(t, b.fake.Deliveries(), 3)
	require.Empty(t, b.fake.DeliveredEvents())
}

func TestWebhookDuplicates(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec),
		stripefake.WithDelivery(stripefake.DeliveryOptions{DuplicateProbability: 1}))
	b.customer(t)
	b.customer(t)
	waitDeliveries(t, b.fake)
	got := rc.received()
	require.Len(t, got, 4)
	seen := map[string]int{}
	for _, ev := range got {
		seen[ev.ID]++
	}
	require.Len(t, seen, 2)
	for id, n := range seen {
		require.Equal(t, 2, n, id)
	}
}

func TestWebhookReorder(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec),
		stripefake.WithDelivery(stripefake.DeliveryOptions{Workers: 1, ReorderWindow: 100 * time.Millisecond}))
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), stripeapi.RecoverySession(cus, 1000, "usd", "Top-up",
		"https://a.example/ok", "https://a.example/no", map[string]string{"charge_id": "w1"}, "rec-w1"))
	require.NoError(t, err)
	require.NoError(t, b.fake.CompleteCheckoutSession(t.Context(), cs.ID, "pm_card_visa"))
	waitDeliveries(t, b.fake)

	created := eventTypes(b.fake.Events())
	require.Equal(t, []string{"customer.created", "payment_method.attached", "charge.succeeded",
		"payment_intent.succeeded", "checkout.session.completed"}, created)
	received := rc.types()
	require.ElementsMatch(t, created, received)
	require.NotEqual(t, created, received)
	require.Less(t, slices.Index(received, "checkout.session.completed"), slices.Index(received, "payment_intent.succeeded"),
		"the completion arrives before the payment it reports")
}

func TestWebhookSetLater(t *testing.T) {
	t.Parallel()
	b := setup(t, stripefake.WithDelivery(stripefake.DeliveryOptions{Backoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}))
	b.customer(t) // no endpoint yet: stored, not delivered

	// The receiver's address is known before it listens, as when billingd
	// starts after the emulator.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	b.fake.SetWebhook("http://"+addr, whsec)
	b.customer(t)
	eventually(t, func() bool { return len(b.fake.Deliveries()) >= 1 }, "a refused attempt")
	require.NotEmpty(t, b.fake.Deliveries()[0].Err)

	rc := newReceiver(t, whsec)
	l, err = net.Listen("tcp", addr)
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(rc.serve), ReadHeaderTimeout: time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })

	waitDeliveries(t, b.fake)
	require.Len(t, rc.received(), 1, "only the event created after SetWebhook")
	require.Len(t, b.fake.Events(), 2)
}

func TestWaitForDeliveriesHonoursContext(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	rc.failNext = 1000
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec),
		stripefake.WithDelivery(stripefake.DeliveryOptions{Backoff: time.Hour}))
	b.customer(t)
	eventually(t, func() bool { return len(b.fake.Deliveries()) == 1 }, "first attempt")
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, b.fake.WaitForDeliveries(ctx), context.DeadlineExceeded, "a retry is still waiting")
}

func TestEventRetention(t *testing.T) {
	t.Parallel()
	b := setup(t, stripefake.WithEventRetention(3))
	b.customer(t)
	first := b.fake.Events()[0].ID
	for range 4 {
		b.customer(t)
	}
	kept := b.fake.Events()
	require.Len(t, kept, 3)
	_, err := b.sc.V1Events.Retrieve(t.Context(), first, nil)
	require.Equal(t, 404, stripeErr(t, err).HTTPStatusCode, "the oldest event is forgotten")
	_, err = b.sc.V1Events.Retrieve(t.Context(), kept[0].ID, nil)
	require.NoError(t, err)
}
