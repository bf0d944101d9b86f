package worker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/metrics"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/worker"
)

const secret = "whsec_test_webhooks_secret"

type bundle struct {
	pool *pgxpool.Pool
	srv  *httptest.Server
}

func setup(t *testing.T) bundle {
	t.Helper()
	pool := dbtest.NewPool(t)
	cfg := &config.Config{}
	require.NoError(t, config.NewFlagSet("test", cfg, func(string) string { return "" }).Parse(nil))
	cfg.StripeWebhookSecret = secret
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	// The client only inserts here: it is not started, so the jobs stay where the handler put them.
	client, err := worker.NewRiverClient(pool, cfg, &jobs.Deps{Pool: pool, Logger: logger, Config: cfg})
	require.NoError(t, err)
	srv := httptest.NewServer(worker.NewWebhooks(pool, client, secret, logger))
	t.Cleanup(srv.Close)
	return bundle{pool: pool, srv: srv}
}

// event returns the JSON of a Stripe event of the given id, type, API version and object.
func event(id, typ, apiVersion string, object map[string]any) []byte {
	b, err := json.Marshal(map[string]any{
		"id": id, "object": "event", "api_version": apiVersion, "created": time.Now().Unix(),
		"type": typ, "livemode": false, "pending_webhooks": 1,
		"data": map[string]any{"object": object},
	})
	if err != nil {
		panic(err)
	}
	return b
}

// post delivers body with the given Stripe-Signature header and returns the status code.
func (b bundle) post(t *testing.T, body []byte, sig string) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, b.srv.URL, bytes.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	if sig != "" {
		req.Header.Set("Stripe-Signature", sig)
	}
	resp, err := b.srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

func sign(body []byte, secret string, at time.Time) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: body, Secret: secret, Timestamp: at}).Header
}

type stored struct {
	Events, Jobs int
}

func (b bundle) stored(t *testing.T) stored {
	t.Helper()
	var s stored
	require.NoError(t, b.pool.QueryRow(context.Background(), `select
		(select count(*) from billing.webhook_events), (select count(*) from river_job)`).Scan(&s.Events, &s.Jobs))
	return s
}

func TestWebhookStoresEventOnceWithItsJob(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	body := event("evt_1", "payment_method.detached", "2025-08-27.basil", map[string]any{"id": "pm_1", "object": "payment_method"})

	before := webhookCount(t, "duplicate")
	require.Equal(t, http.StatusOK, b.post(t, body, sign(body, secret, time.Now())))
	// Stripe redelivers the same event with a new signature, later.
	require.Equal(t, http.StatusOK, b.post(t, body, sign(body, secret, time.Now().Add(time.Second))))
	require.Equal(t, http.StatusOK, b.post(t, body, sign(body, secret, time.Now())))
	require.Equal(t, stored{Events: 1, Jobs: 1}, b.stored(t))
	require.GreaterOrEqual(t, webhookCount(t, "duplicate")-before, 2.0)

	var (
		typ, status, objectID string
		apiVersion            *string
		mismatch              bool
		payload               map[string]any
	)
	require.NoError(t, b.pool.QueryRow(ctx, `select type, status, object_id, api_version, api_version_mismatch, payload
		from billing.webhook_events where id = 'evt_1'`).Scan(&typ, &status, &objectID, &apiVersion, &mismatch, &payload))
	require.Equal(t, "payment_method.detached", typ)
	require.Equal(t, "received", status)
	require.Equal(t, "pm_1", objectID)
	require.Equal(t, "2025-08-27.basil", *apiVersion)
	require.False(t, mismatch)
	require.Equal(t, "evt_1", payload["id"])

	var args map[string]string
	var kind, queue string
	require.NoError(t, b.pool.QueryRow(ctx, `select kind, queue, args from river_job`).Scan(&kind, &queue, &args))
	require.Equal(t, "ingest_event", kind)
	require.Equal(t, jobs.QueueWebhooks, queue)
	require.Equal(t, map[string]string{"event_id": "evt_1"}, args)
}

func TestWebhookConcurrentRedeliveriesStoreOnce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	body := event("evt_race", "checkout.session.expired", "2025-08-27.basil", map[string]any{"id": "cs_test_1", "object": "checkout.session"})
	var wg sync.WaitGroup
	codes := make([]int, 8)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest(http.MethodPost, b.srv.URL, bytes.NewReader(body))
			req.Header.Set("Stripe-Signature", sign(body, secret, time.Now()))
			resp, err := b.srv.Client().Do(req)
			if err == nil {
				codes[i] = resp.StatusCode
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	for _, c := range codes {
		require.Equal(t, http.StatusOK, c)
	}
	require.Equal(t, stored{Events: 1, Jobs: 1}, b.stored(t))
}

func TestWebhookAcceptsOtherAPIVersionsAndFlagsThem(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cases := []struct {
		version  string
		mismatch bool
	}{
		{"2025-08-27.basil", false},
		{"2025-06-30.basil", false}, // same release train: compatible, as stripe-go decides
		{"2025-09-30.clover", true},
		{"2024-06-20", true}, // before release trains
	}
	for i, tc := range cases {
		id := fmt.Sprintf("evt_v%d", i)
		body := event(id, "customer.updated", tc.version, map[string]any{"id": "cus_1", "object": "customer"})
		require.Equal(t, http.StatusOK, b.post(t, body, sign(body, secret, time.Now())), tc.version)
		var mismatch bool
		require.NoError(t, b.pool.QueryRow(context.Background(),
			`select api_version_mismatch from billing.webhook_events where id = $1`, id).Scan(&mismatch))
		require.Equal(t, tc.mismatch, mismatch, tc.version)
	}
	require.Equal(t, stored{Events: len(cases), Jobs: len(cases)}, b.stored(t), "no event dropped")
}

func TestWebhookRejectsAndStoresNothing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	good := event("evt_good", "payment_method.detached", "2025-08-27.basil", map[string]any{"id": "pm_1"})
	// Bodies that are signed correctly but are not events billingd can use.
	notJSON := []byte(`{"id": "evt_x", "type": `)
	notObject := []byte(`[1, 2, 3]`)
	noID := event("", "payment_method.detached", "2025-08-27.basil", map[string]any{"id": "pm_1"})
	badID := event("ch_1", "payment_method.detached", "2025-08-27.basil", map[string]any{"id": "pm_1"})
	noType := event("evt_nt", "", "2025-08-27.basil", map[string]any{"id": "pm_1"})
	noData := []byte(fmt.Sprintf(`{"id":"evt_nd","object":"event","type":"payment_method.detached","created":%d}`, time.Now().Unix()))
	noCreated := []byte(`{"id":"evt_nc","object":"event","type":"payment_method.detached","data":{"object":{"id":"pm_1"}}}`)
	// Just over 1 MiB, signed correctly: refused for its size before anything else.
	pad := strings.Repeat("x", worker.MaxWebhookBody)
	huge := event("evt_huge", "payment_method.detached", "2025-08-27.basil", map[string]any{"id": "pm_1", "pad": pad})
	tampered := bytes.Replace(good, []byte("pm_1"), []byte("pm_2"), 1)

	cases := []struct {
		name string
		body []byte
		sig  string
		want int
	}{
		{"no signature header", good, "", http.StatusBadRequest},
		{"garbage signature header", good, "nonsense", http.StatusBadRequest},
		{"header without v1", good, fmt.Sprintf("t=%d", time.Now().Unix()), http.StatusBadRequest},
		{"signed with another secret", good, sign(good, "whsec_other", time.Now()), http.StatusBadRequest},
		{"body changed after signing", tampered, sign(good, secret, time.Now()), http.StatusBadRequest},
		{"stale timestamp", good, sign(good, secret, time.Now().Add(-301*time.Second)), http.StatusBadRequest},
		{"very stale timestamp", good, sign(good, secret, time.Now().Add(-24*time.Hour)), http.StatusBadRequest},
		{"malformed JSON", notJSON, sign(notJSON, secret, time.Now()), http.StatusBadRequest},
		{"JSON array", notObject, sign(notObject, secret, time.Now()), http.StatusBadRequest},
		{"no event id", noID, sign(noID, secret, time.Now()), http.StatusBadRequest},
		{"not an event id", badID, sign(badID, secret, time.Now()), http.StatusBadRequest},
		{"no type", noType, sign(noType, secret, time.Now()), http.StatusBadRequest},
		{"no data", noData, sign(noData, secret, time.Now()), http.StatusBadRequest},
		{"no created time", noCreated, sign(noCreated, secret, time.Now()), http.StatusBadRequest},
		{"oversized body", huge, sign(huge, secret, time.Now()), http.StatusRequestEntityTooLarge},
	}
	rejected := webhookCount(t, "rejected")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, b.post(t, tc.body, tc.sig))
			require.Equal(t, stored{}, b.stored(t), "nothing stored")
		})
	}
	require.GreaterOrEqual(t, webhookCount(t, "rejected")-rejected, float64(len(cases)))

	// The same good event within the tolerance is accepted: the cases above failed for their fault.
	// (Signed 290 s ago, not 299: a loaded machine can take a second or more to verify it.)
	require.Equal(t, http.StatusOK, b.post(t, good, sign(good, secret, time.Now().Add(-290*time.Second))))
	require.Equal(t, stored{Events: 1, Jobs: 1}, b.stored(t))
}

func TestDaemonRoutesWebhooks(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	cfg := &config.Config{}
	require.NoError(t, config.NewFlagSet("test", cfg, func(string) string { return "" }).Parse(nil))
	cfg.StripeWebhookSecret = secret
	cfg.HTTPAddr = "127.0.0.1:0"
	d, err := worker.New(cfg, pool, slog.New(slog.NewTextHandler(io.Discard, nil)))
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	base := "http://" + ln.Addr().String()

	body := event("evt_routed", "customer.created", "2025-08-27.basil", map[string]any{"id": "cus_1", "object": "customer"})
	req, err := http.NewRequest(http.MethodPost, base+"/webhooks/stripe", bytes.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Stripe-Signature", sign(body, secret, time.Now()))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	resp, err = http.Get(base + "/webhooks/stripe")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)

	// The running daemon ingests the event: a type billingd does not act on is recorded as ignored.
	require.Eventually(t, func() bool {
		var status string
		_ = pool.QueryRow(context.Background(), `select status from billing.webhook_events where id = 'evt_routed'`).Scan(&status)
		return status == "ignored"
	}, 10*time.Second, 20*time.Millisecond)
}

// webhookCount reads billingd_webhook_events_total{result=...} from the served registry.
func webhookCount(t *testing.T, result string) float64 {
	t.Helper()
	families, err := metrics.Registry.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() != "billingd_webhook_events_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
