// Package stripefake is a stateful, in-memory emulator of the parts of the
// Stripe API that billingd uses. It is an [http.Handler]: serve it with
// httptest.NewServer in tests, or with cmd/stripefake by hand, and point
// stripe-go's API backend at its URL.
//
// It behaves like Stripe where billingd can tell the difference: form
// parameters with bracket nesting, unknown parameters rejected, Stripe's JSON
// error shape, the test payment methods by their Stripe names (pm_card_visa,
// pm_card_chargeDeclined, ...) with Stripe's decline codes, idempotency keys
// with replay, signed webhooks with retries, PaymentIntent search by metadata,
// and hosted Checkout pages that a test (or a person) completes as the
// customer.
//
// On top of that it misbehaves on demand: latency, HTTP 500 before or after
// the work is done, a dropped connection after the work is done, and HTTP 429
// above a configured request rate (see [Server.InjectFaults],
// [Server.SetFaultRate] and [Server.SetRateLimit]). Inspection methods
// ([Server.SuccessfulCharges], [Server.Totals], [Server.PaymentIntentsByMetadata],
// ...) let exactly-once tests assert what the "real" Stripe would have done.
//
// A Server starts background goroutines (webhook delivery, expiry sweeps);
// call [Server.Close] when done.
//
// Parameters that stripefake does not model are rejected as unknown, the way
// Stripe rejects parameters it does not know. A request shape billingd starts
// sending must therefore be added here deliberately; internal/stripeapi's
// conformance test checks the same shapes against stripe-mock.
package stripefake
