package stripeapi_test

import (
	"bytes"
	"context"
	"errors"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

// stripeMockVersion is the stripe-mock the conformance test runs; its
// OpenAPI description is newer than stripe-go v82's API version, so the
// builders send nothing the two disagree on (ui_mode, for one).
const stripeMockVersion = "v0.203.0"

// Two installations' ids, in billing.installation's form.
const (
	installation      = "5f0c8c1e-3b7a-4d2e-9a41-0c6f2b8e7d19"
	otherInstallation = "0b9e4f7a-1c2d-4e5f-8a9b-3c4d5e6f7a8b"
)

// TestConformance sends every request shape billingd makes, through
// stripe-go, to stripe-mock (which validates it against Stripe's OpenAPI
// description) and to stripefake, and requires both to accept it.
func TestConformance(t *testing.T) {
	t.Parallel()

	fake := stripefake.New()
	t.Cleanup(fake.Close)
	fakeSrv := httptest.NewServer(fake)
	t.Cleanup(fakeSrv.Close)

	targets := []struct {
		name string
		url  string
		fake *stripefake.Server // nil for stripe-mock
	}{
		{"stripe-mock", startStripeMock(t), nil},
		{"stripefake", fakeSrv.URL, fake},
	}
	for _, tc := range targets {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			sc := stripeapi.NewClient("sk_test_conformance", tc.url, nil, 0)
			md := map[string]string{stripeapi.MetadataChargeID: "4242", "plan": "p1", stripeapi.MetadataInstallation: installation}

			cus, err := sc.V1Customers.Create(ctx, stripeapi.CustomerCreate(installation, "ref-1", "ada@example.com"))
			require.NoError(t, err, "customer create")
			require.NotEmpty(t, cus.ID)
			if tc.fake != nil {
				require.Equal(t, installation, cus.Metadata[stripeapi.MetadataInstallation])
			}

			setup, err := sc.V1CheckoutSessions.Create(ctx, stripeapi.OnboardingSession(installation, 1, cus.ID, "EUR",
				"https://app.example/ok?session={CHECKOUT_SESSION_ID}", "https://app.example/cancel",
				map[string]string{"setup_session_id": "1"}, "I agree to be charged later."))
			require.NoError(t, err, "setup session create")
			require.NotEmpty(t, setup.URL)
			if tc.fake != nil {
				require.Equal(t, installation, setup.Metadata[stripeapi.MetadataInstallation])
			}

			// The SetupIntent exists once the customer has saved a card;
			// stripe-mock is stateless and answers for any id.
			siID, pmID := "seti_123", "pm_card_visa"
			if tc.fake != nil {
				require.NoError(t, tc.fake.CompleteCheckoutSession(ctx, setup.ID, "pm_card_visa"))
				done, err := sc.V1CheckoutSessions.Retrieve(ctx, setup.ID, nil)
				require.NoError(t, err)
				require.NotNil(t, done.SetupIntent)
				siID = done.SetupIntent.ID
			}
			si, err := sc.V1SetupIntents.Retrieve(ctx, siID, stripeapi.SetupIntentRetrieve())
			require.NoError(t, err, "setup intent retrieve")
			require.NotNil(t, si.PaymentMethod)
			if tc.fake != nil {
				require.NotNil(t, si.PaymentMethod.Card, "payment_method is expanded")
				require.Equal(t, "4242", si.PaymentMethod.Card.Last4)
				pmID = si.PaymentMethod.ID
			}

			pm, err := sc.V1PaymentMethods.Attach(ctx, pmID, stripeapi.PaymentMethodAttach(cus.ID))
			require.NoError(t, err, "payment method attach")
			require.NotEmpty(t, pm.ID)

			pi, err := sc.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cus.ID, pm.ID, 1999, "EUR",
				"Installment 1 of 3", md, stripeapi.KeyPrefix(installation)+"charge-4242-attempt-1"))
			require.NoError(t, err, "off-session payment intent")
			require.NotEmpty(t, pi.ID)
			// Another installation's charge 4242, in the same account: not found by this one's search.
			otherMD := map[string]string{stripeapi.MetadataChargeID: "4242", stripeapi.MetadataInstallation: otherInstallation}
			_, err = sc.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cus.ID, pm.ID, 1999, "EUR",
				"Installment 1 of 3", otherMD, stripeapi.KeyPrefix(otherInstallation)+"charge-4242-attempt-1"))
			require.NoError(t, err, "another installation's payment intent")

			var found []*stripe.PaymentIntent
			for p, err := range sc.V1PaymentIntents.Search(ctx, stripeapi.PaymentIntentSearchByCharge(installation, "4242")) {
				require.NoError(t, err, "payment intent search")
				found = append(found, p)
			}
			if tc.fake != nil {
				require.Len(t, found, 1)
				require.Equal(t, pi.ID, found[0].ID)
				require.Equal(t, stripe.PaymentIntentStatusSucceeded, found[0].Status)
			}

			re, err := sc.V1Refunds.Create(ctx, stripeapi.Refund(pi.ID, 500, md, "refund-4242-1"))
			require.NoError(t, err, "refund")
			require.NotEmpty(t, re.ID)
			full, err := sc.V1Refunds.Create(ctx, stripeapi.Refund(pi.ID, 0, nil, "refund-4242-2"))
			require.NoError(t, err, "full refund")
			if tc.fake != nil {
				require.Equal(t, int64(1499), full.Amount, "amount 0 refunds the rest")
			}

			rec, err := sc.V1CheckoutSessions.Create(ctx, stripeapi.RecoverySession(cus.ID, 1999, "eur",
				"Installment 1 of 3", "https://app.example/paid", "https://app.example/cancel", md, "recovery-4242-1"))
			require.NoError(t, err, "recovery session")
			require.NotEmpty(t, rec.URL)

			expired, err := sc.V1CheckoutSessions.Expire(ctx, rec.ID, stripeapi.ExpireSession())
			require.NoError(t, err, "expire session")
			if tc.fake != nil {
				require.Equal(t, stripe.CheckoutSessionStatusExpired, expired.Status)
			}

			// A paid recovery session, read with its PaymentIntent and card.
			paid, err := sc.V1CheckoutSessions.Create(ctx, stripeapi.RecoverySession(cus.ID, 1999, "eur",
				"Installment 1 of 3", "https://app.example/paid", "https://app.example/cancel", md, "recovery-4242-2"))
			require.NoError(t, err, "second recovery session")
			if tc.fake != nil {
				require.NoError(t, tc.fake.CompleteCheckoutSession(ctx, paid.ID, "pm_card_mastercard"))
			}
			got, err := sc.V1CheckoutSessions.Retrieve(ctx, paid.ID, stripeapi.SessionRetrieve())
			require.NoError(t, err, "session retrieve")
			require.NotNil(t, got.PaymentIntent)
			piRead, err := sc.V1PaymentIntents.Retrieve(ctx, got.PaymentIntent.ID, stripeapi.PaymentIntentRetrieve())
			require.NoError(t, err, "payment intent retrieve")
			require.NotNil(t, piRead.PaymentMethod)
			if tc.fake != nil {
				require.NotNil(t, got.PaymentIntent.PaymentMethod, "payment_intent.payment_method is expanded")
				require.Equal(t, "4444", got.PaymentIntent.PaymentMethod.Card.Last4)
				require.NotNil(t, piRead.PaymentMethod.Card, "payment_method is expanded")
				require.Equal(t, cus.ID, piRead.PaymentMethod.Customer.ID, "setup_future_usage attached the card")
			}
		})
	}
}

// TestBuilders pins the details of the request shapes that the conformance
// test cannot see from the answers.
func TestBuilders(t *testing.T) {
	t.Parallel()

	cc := stripeapi.CustomerCreate(installation, "ref-9", "x@example.com")
	require.Equal(t, "billingd-"+installation+"-customer-create:ref-9", *cc.IdempotencyKey)
	require.Equal(t, "ref-9", cc.Metadata[stripeapi.MetadataCustomerRef])
	require.Equal(t, installation, cc.Metadata[stripeapi.MetadataInstallation])

	ss := stripeapi.SetupSession("cus_1", "USD", "https://s", "https://c", map[string]string{"k": "v"}, "")
	require.Nil(t, ss.UIMode, "ui_mode must not be sent")
	require.Nil(t, ss.ConsentCollection, "no terms, no consent collection")
	require.Equal(t, "usd", *ss.Currency)
	require.Equal(t, "v", ss.SetupIntentData.Metadata["k"])

	pi := stripeapi.OffSessionPaymentIntent("cus_1", "pm_1", 100, "JPY", "", nil, "k1")
	require.True(t, *pi.OffSession)
	require.True(t, *pi.Confirm)
	require.Nil(t, pi.Description)
	require.Equal(t, "jpy", *pi.Currency)
	require.Equal(t, "k1", *pi.IdempotencyKey)

	rs := stripeapi.RecoverySession("cus_1", 5000, "usd", "Top-up", "https://s", "https://c", map[string]string{"charge_id": "7"}, "k2")
	require.Nil(t, rs.UIMode)
	require.Equal(t, "off_session", *rs.PaymentIntentData.SetupFutureUsage)
	require.Equal(t, "7", rs.PaymentIntentData.Metadata["charge_id"])
	require.Equal(t, int64(1), *rs.LineItems[0].Quantity)

	q := stripeapi.PaymentIntentSearchByCharge(installation, `it's`)
	require.Equal(t, `metadata['charge_id']:'it\'s' AND metadata['billingd_installation']:'`+installation+`'`, q.Query)
	q = stripeapi.PaymentIntentSearchByCharge("", "42")
	require.Equal(t, `metadata['charge_id']:'42'`, q.Query, "an attempt made before keys named the installation")

	require.Nil(t, stripeapi.Refund("pi_1", 0, nil, "k3").Amount, "0 refunds everything left")
}

// TestKeyInstallation reads the installation back from the keys billingd makes, and finds none in
// the keys it made before keys named one.
func TestKeyInstallation(t *testing.T) {
	t.Parallel()
	for key, want := range map[string]string{
		stripeapi.KeyPrefix(installation) + "charge-42-attempt-1":           installation,
		stripeapi.CustomerKey(installation, "user-42"):                      installation,
		stripeapi.SetupSessionKey(otherInstallation, 7):                     otherInstallation,
		stripeapi.KeyPrefix(installation) + "recovery-42-r1-s1":             installation,
		"billingd-charge-42-attempt-1":                                      "",
		"billingd-recovery-42-r1-s1":                                        "",
		"customer-create:user-42":                                           "",
		"setup-session:7":                                                   "",
		"billingd-" + strings.ToUpper(installation) + "-charge-1-attempt-1": "",
		"billingd-" + installation:                                          "",
	} {
		require.Equal(t, want, stripeapi.KeyInstallation(key), key)
	}
}

// TestNewClientUsesAPIBase checks that requests go to the given base URL
// with the key, and that a client with another base does not share it.
func TestNewClientUsesAPIBase(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.Method+" "+r.URL.Path+" "+r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"id":"cus_x","object":"customer"}`))
	}))
	t.Cleanup(srv.Close)

	sc := stripeapi.NewClient("sk_test_a", srv.URL+"/", srv.Client(), 0)
	cus, err := sc.V1Customers.Retrieve(t.Context(), "cus_x", nil)
	require.NoError(t, err)
	require.Equal(t, "cus_x", cus.ID)

	other := stripeapi.NewClient("sk_test_b", "http://127.0.0.1:1", nil, 0)
	_, err = other.V1Customers.Retrieve(t.Context(), "cus_x", nil)
	require.Error(t, err, "a second client keeps its own base URL")

	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []string{"GET /v1/customers/cus_x Bearer sk_test_a"}, got)
}

// startStripeMock runs stripe-mock on a free port until the test ends and
// returns its URL. It installs stripe-mock with go install if it is missing.
func startStripeMock(t *testing.T) string {
	t.Helper()
	bin := stripeMockBinary(t)
	for attempt := 0; ; attempt++ {
		port := freePort(t)
		var out bytes.Buffer
		cmd := exec.Command(bin, "-http-port", strconv.Itoa(port))
		cmd.Stdout, cmd.Stderr = &out, &out
		require.NoError(t, cmd.Start(), "start stripe-mock")
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		url := "http://127.0.0.1:" + strconv.Itoa(port)
		if err := waitForStripeMock(t.Context(), url, exited); err != nil {
			_ = cmd.Process.Kill()
			<-exited
			if attempt < 2 { // the port may have been taken meanwhile
				continue
			}
			t.Fatalf("stripe-mock did not start: %v\n%s", err, out.String())
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			<-exited
		})
		return url
	}
}

func waitForStripeMock(ctx context.Context, url string, exited <-chan error) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/v1/customers/cus_ping", nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer sk_test_ping")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_ = resp.Body.Close()
			return nil
		}
		select {
		case err := <-exited:
			return errors.Join(errors.New("stripe-mock exited"), err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())
	return port
}

// stripeMockBinary finds stripe-mock in GOPATH/bin or PATH, installing the
// pinned version when it is in neither.
func stripeMockBinary(t *testing.T) string {
	t.Helper()
	gopath, err := exec.Command("go", "env", "GOPATH").Output()
	require.NoError(t, err, "go env GOPATH")
	local := filepath.Join(strings.TrimSpace(string(gopath)), "bin", "stripe-mock")
	if _, err := os.Stat(local); err == nil {
		return local
	}
	if p, err := exec.LookPath("stripe-mock"); err == nil {
		return p
	}
	out, err := exec.Command("go", "install", "github.com/stripe/stripe-mock@"+stripeMockVersion).CombinedOutput()
	require.NoError(t, err, "go install stripe-mock: %s", out)
	_, err = os.Stat(local)
	require.NoError(t, err, "stripe-mock installed but not found at %s", local)
	return local
}

// TestCustomerKeyFitsStripesLimit checks that the customer key of the longest customer_ref the
// schema allows (255 characters, of up to 4 bytes each) fits in Stripe's 255, stays the same for
// the same ref, and differs between refs; a short ref keeps its readable key.
func TestCustomerKeyFitsStripesLimit(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("é", 255)
	k := stripeapi.CustomerKey(installation, long)
	require.LessOrEqual(t, len(k), stripeapi.MaxKeyLen)
	require.Equal(t, k, stripeapi.CustomerKey(installation, long))
	require.NotEqual(t, k, stripeapi.CustomerKey(installation, long[:len(long)-2]+"e"))
	require.Equal(t, installation, stripeapi.KeyInstallation(k))
	require.Equal(t, stripeapi.KeyPrefix(installation)+"customer-create:user-42", stripeapi.CustomerKey(installation, "user-42"))
	require.LessOrEqual(t, len(stripeapi.SetupSessionKey(installation, math.MaxInt64)), stripeapi.MaxKeyLen)
}
