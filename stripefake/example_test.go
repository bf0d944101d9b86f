package stripefake_test

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"

	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

// Example runs billingd's happy and unhappy paths against the emulator:
// save a card through a setup-mode Checkout Session, charge it off-session
// twice with one idempotency key, then charge a card that declines.
func Example() {
	ctx := context.Background()
	fake := stripefake.New()
	defer fake.Close()
	srv := httptest.NewServer(fake)
	defer srv.Close()
	sc := stripeapi.NewClient("sk_test_example", srv.URL, srv.Client(), 0)

	cus, _ := sc.V1Customers.Create(ctx, stripeapi.CustomerCreate("5f0c8c1e-3b7a-4d2e-9a41-0c6f2b8e7d19", "ref-1", "ada@example.com"))
	cs, _ := sc.V1CheckoutSessions.Create(ctx, stripeapi.SetupSession(cus.ID, "usd",
		"https://app.example/ok", "https://app.example/cancel", nil, ""))
	_ = fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_visa") // the customer saves a card
	cs, _ = sc.V1CheckoutSessions.Retrieve(ctx, cs.ID, nil)
	si, _ := sc.V1SetupIntents.Retrieve(ctx, cs.SetupIntent.ID, stripeapi.SetupIntentRetrieve())
	fmt.Println("saved", si.PaymentMethod.Card.Brand, si.PaymentMethod.Card.Last4)

	md := map[string]string{"charge_id": "17"}
	for range 2 { // a retry with the same key replays the first answer
		pi, _ := sc.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cus.ID, si.PaymentMethod.ID, 2500, "usd", "", md, "charge-17-attempt-1"))
		fmt.Printf("%s replayed=%q\n", pi.Status, pi.LastResponse.Header.Get("Idempotent-Replayed"))
	}
	fmt.Println("charges for 17:", fake.SuccessfulCharges("17"))

	_, err := sc.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cus.ID, "pm_card_chargeDeclinedInsufficientFunds", 2500, "usd", "", nil, "charge-18-attempt-1"))
	var se *stripe.Error
	if errors.As(err, &se) {
		fmt.Println(se.HTTPStatusCode, se.Code, se.DeclineCode, se.PaymentIntent.Status)
	}
	// Output:
	// saved visa 4242
	// succeeded replayed=""
	// succeeded replayed="true"
	// charges for 17: 1
	// 402 card_declined insufficient_funds requires_payment_method
}
